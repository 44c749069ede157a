"""Synthetic data from Private Evolution as a LightningDataModule: train anything on it with a plain
Trainer, at no further privacy cost (the samples are post-processing of the job's DP releases).

Example:
    >>> import torch
    >>> pe = PrivateEvolution(lambda label, n: torch.randn(n, 3), lambda x, s: x + s * torch.randn_like(x),
    ...                       embed=lambda x: x, num_samples=20, iterations=2, epsilon=2.0, classes=[0, 1],
    ...                       progress=False, generator=torch.Generator().manual_seed(0))
    >>> data = pe.fit(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    >>> x, y = next(iter(data.datamodule(batch_size=8).train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((8, 3), torch.int64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_dp.mechanism.private_evolution import PEResult
from lightning_dp.mechanism.private_evolution import PrivateEvolution as _PrivateEvolution

__all__ = ["PrivateEvolution", "SyntheticData", "SyntheticDataModule"]


class _Pairs(Dataset):
    """(sample, label) pairs of samples that are not tensors (e.g. strings)."""

    def __init__(self, samples: Any, labels: torch.Tensor) -> None:
        self.samples, self.labels = samples, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return self.samples[i], self.labels[i]


class SyntheticDataModule(pl.LightningDataModule):
    """``train_dataloader`` over the synthetic ``(sample, label)`` pairs of ``result`` (shuffled);
    ``transform`` maps all the samples once (e.g. parameters to images: post-processing, free)."""

    def __init__(self, result: PEResult, batch_size: int = 64, num_workers: int = 0,
                 transform: Optional[Callable[[Any], Any]] = None) -> None:
        super().__init__()
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.result, self.batch_size, self.num_workers, self.transform = result, batch_size, num_workers, transform

    def dataset(self) -> Dataset:
        samples = self.result.samples if self.transform is None else self.transform(self.result.samples)
        if isinstance(samples, torch.Tensor):
            return TensorDataset(samples, self.result.labels)
        return _Pairs(samples, self.result.labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)


@dataclass
class SyntheticData(PEResult):
    """A :class:`~lightning_dp.mechanism.private_evolution.PEResult` with :meth:`datamodule`."""

    def datamodule(self, batch_size: int = 64, num_workers: int = 0,
                   transform: Optional[Callable[[Any], Any]] = None) -> SyntheticDataModule:
        """A LightningDataModule over the synthetic samples (mapped by ``transform``) and labels."""
        return SyntheticDataModule(self, batch_size=batch_size, num_workers=num_workers, transform=transform)


class PrivateEvolution(_PrivateEvolution):
    __doc__ = _PrivateEvolution.__doc__
    result_type = SyntheticData
