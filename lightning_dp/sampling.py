"""Poisson sampling of a user's training ``DataLoader``.

DP-SGD's privacy analysis (the *sampled* Gaussian mechanism) assumes that each example
joins each batch independently with probability ``q``. A shuffled loader with a fixed batch
size is a different mechanism, so :func:`poisson_dataloader` rebuilds the user's loader
around a :class:`PoissonBatchSampler` and keeps everything else the user chose (dataset,
``collate_fn``, workers, pinning, generator).

Each draw is yielded as a :class:`PoissonBatch`: the sampled examples already split into
physical chunks of at most ``max_physical_batch_size`` and collated by the user's
``collate_fn``. Carrying the exact example count lets the strategy (a) skip
``training_step`` on an empty draw while still taking the noise-only step the analysis
accounts for, (b) verify that per-sample gradients have one row per example, and (c) refuse
any training batch that did not come from this sampler.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

__all__ = ["PoissonBatch", "PoissonBatchSampler", "poisson_dataloader"]


@dataclass(frozen=True)
class PoissonBatch:
    """One Poisson draw, split into physical chunks.

    Attributes:
        chunks: the sampled examples, each chunk collated by the user's ``collate_fn``.
        sizes: number of examples in each chunk (``len(sizes) == len(chunks)``).
        sample_rate: the rate ``q`` each example was drawn with.
        expected_size: the expected number of examples per draw, ``q * N``; the DP-SGD
            update is divided by this, never by the realised size (which is private).
    """

    chunks: tuple[Any, ...]
    sizes: tuple[int, ...]
    sample_rate: float
    expected_size: float

    @property
    def size(self) -> int:
        """Number of examples drawn (may be 0)."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return self.size


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields index lists where each of ``num_samples`` indices is included independently
    with probability ``sample_rate``.

    Args:
        num_samples: size of the dataset ``N``.
        sample_rate: inclusion probability ``q`` in ``(0, 1]``.
        steps: number of draws per epoch (the epoch's length).
        generator: the random source. ``None`` uses torch's global generator, so
            ``seed_everything`` makes runs reproducible.
        secure_mode: draw each batch from a generator freshly seeded with OS entropy,
            so the draws cannot be replayed from a seed set in code.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=10, sample_rate=0.3, steps=4)
        >>> len(sampler)
        4
        >>> all(0 <= i < 10 for batch in sampler for i in batch)
        True
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator
        self.secure_mode = secure_mode
        # The dataset indices the draws range over (this process's shard); all by default.
        self.indices = None if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        if self.indices is not None and len(self.indices) != num_samples:
            raise ValueError("indices must list num_samples dataset indices")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            generator = self.generator
            if self.secure_mode:
                generator = torch.Generator().manual_seed(secrets.randbits(63))
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            chosen = mask.nonzero(as_tuple=True)[0]
            yield (chosen if self.indices is None else self.indices[chosen]).tolist()


class _PoissonCollate:
    """Collates a Poisson draw into a :class:`PoissonBatch` of physical chunks.

    A top-level class (not a closure) so loaders with worker processes can pickle it.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any],
        max_physical_batch_size: Optional[int],
        sample_rate: float,
        expected_size: float,
    ) -> None:
        self.collate_fn = collate_fn
        self.max_physical_batch_size = max_physical_batch_size
        self.sample_rate = sample_rate
        self.expected_size = expected_size

    def __call__(self, samples: Sequence[Any]) -> PoissonBatch:
        samples = list(samples)
        k = self.max_physical_batch_size or max(len(samples), 1)
        groups = [samples[i : i + k] for i in range(0, len(samples), k)]
        return PoissonBatch(
            chunks=tuple(self.collate_fn(g) for g in groups),
            sizes=tuple(len(g) for g in groups),
            sample_rate=self.sample_rate,
            expected_size=self.expected_size,
        )


def poisson_dataloader(
    dataloader: DataLoader,
    max_physical_batch_size: Optional[int] = None,
    secure_mode: bool = False,
    rank: int = 0,
    world_size: int = 1,
    generator: Optional[torch.Generator] = None,
) -> DataLoader:
    """Rebuild ``dataloader`` so each batch is a Poisson sample of its dataset.

    The sampling rate is ``q = world_size * batch_size / len(dataset)`` and an epoch has
    ``ceil(len(dataset) / (world_size * batch_size))`` draws, the length of the original loader
    (of each process's share of it). With several processes, process ``rank`` samples the
    disjoint shard ``rank, rank + world_size, ...`` at rate ``q``, so the union over processes
    is a Poisson sample of the whole dataset. The dataset, ``collate_fn``, worker settings and
    pinning are kept; draws use ``generator`` if given, else the loader's, else torch's global
    generator.

    Raises:
        TypeError: for an ``IterableDataset`` or a dataset without ``__len__``.
        ValueError: when the loader has no usable ``batch_size`` (a custom
            ``batch_sampler``, or ``batch_size=None``), uses a sampler that would select
            other examples than a uniform draw (weighted or subset samplers), or its batch
            size exceeds the dataset.
    """
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "DP training needs random access to the training set to Poisson-sample it, but the "
            "training DataLoader wraps an IterableDataset. Use a map-style Dataset "
            "(with __len__ and __getitem__)."
        )
    if not hasattr(dataset, "__len__"):
        raise TypeError("The training dataset has no __len__, so it cannot be Poisson-sampled.")
    batch_size = dataloader.batch_size
    if batch_size is None:
        raise ValueError(
            "The training DataLoader has no batch_size (it uses a custom batch_sampler or "
            "batch_size=None). DP training derives the sampling rate q = batch_size / len(dataset) "
            "from it: pass DataLoader(dataset, batch_size=B) and drop the batch_sampler."
        )
    sampler = dataloader.sampler
    injected = world_size > 1 and isinstance(sampler, DistributedSampler)  # Lightning's, for DDP: the shard replaces it
    if not injected and type(sampler) not in (RandomSampler, SequentialSampler):
        raise ValueError(
            f"The training DataLoader uses a {type(sampler).__name__}; DP training replaces the "
            "sampler with Poisson sampling over the whole dataset, which would train on examples "
            "your sampler excludes or weights differently. Restrict the data with "
            "torch.utils.data.Subset instead and use a plain DataLoader(dataset, batch_size=B)."
        )
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        raise ValueError(
            "The training DataLoader's RandomSampler draws with replacement or a custom num_samples; "
            "DP training replaces it with Poisson sampling. Use DataLoader(dataset, batch_size=B, "
            "shuffle=True)."
        )
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("The training dataset is empty.")
    if world_size * batch_size > num_samples:
        raise ValueError(
            f"batch_size={batch_size} x {world_size} process(es) exceeds the training set ({num_samples} examples); "
            "the sampling rate q = processes * batch_size / len(dataset) must be at most 1."
        )
    if max_physical_batch_size is not None and max_physical_batch_size <= 0:
        raise ValueError(f"max_physical_batch_size must be positive, got {max_physical_batch_size}")

    sample_rate = world_size * batch_size / num_samples
    shard = range(rank, num_samples, world_size)
    batch_sampler = PoissonBatchSampler(
        num_samples=len(shard),
        sample_rate=sample_rate,
        steps=math.ceil(num_samples / (world_size * batch_size)),
        generator=generator if generator is not None else dataloader.generator,
        secure_mode=secure_mode,
        indices=shard if world_size > 1 else None,
    )
    collate = _PoissonCollate(
        dataloader.collate_fn or default_collate,
        max_physical_batch_size,
        sample_rate,
        expected_size=float(world_size * batch_size),  # q * N: the global expected batch
    )
    extra: dict[str, Any] = {}
    if dataloader.num_workers > 0:
        extra["prefetch_factor"] = dataloader.prefetch_factor
        extra["persistent_workers"] = dataloader.persistent_workers
    if getattr(dataloader, "in_order", True) is False:
        extra["in_order"] = False
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        pin_memory_device=dataloader.pin_memory_device,
        **extra,
    )


def fetch_examples(dataloader: DataLoader, indices: Sequence[int]) -> dict[int, Any]:
    """The dataset items at ``indices`` of a Poisson loader's dataset, fetched once each."""
    return {i: dataloader.dataset[i] for i in indices}


def collate_examples(dataloader: DataLoader, examples: Sequence[Any]) -> Any:
    """Collate dataset items as one batch with the user's ``collate_fn``.

    Used by the per-sample gradient check to build batches from real training examples.
    """
    collate = dataloader.collate_fn
    assert isinstance(collate, _PoissonCollate)
    return collate.collate_fn(list(examples))


def is_poisson_dataloader(dataloader: object) -> bool:
    return isinstance(dataloader, DataLoader) and isinstance(dataloader.collate_fn, _PoissonCollate)

