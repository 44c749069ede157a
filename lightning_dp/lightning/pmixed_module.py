"""PMixED for Lightning users: ``trainer.predict`` over a loader of prompts, each continued by a
:class:`~lightning_dp.PMixED` service (one query per generated token, from one shared budget).

The service's budget is one object in one process: a predict run on several processes would give
each its own copy of the budget and spend it several times over, so it is refused.

Example:
    >>> import torch, lightning as L
    >>> from lightning_dp import PMixED
    >>> service = PMixED(lambda ids: torch.zeros(6), [lambda ids: torch.eye(6)[1] * 3] * 4, epsilon=8.0,
    ...                  delta=1e-5, query_budget=8, sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    >>> trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> prompts = torch.utils.data.DataLoader(torch.tensor([[0, 1], [2, 3]]), batch_size=2)
    >>> out = trainer.predict(PMixEDModule(service, max_new_tokens=3), prompts)
    >>> [len(ids) for ids in out[0]], service.queries_used
    ([5, 5], 6)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["PMixEDModule", "prompts_of"]


class PMixEDModule(pl.LightningModule):
    """``predict_step`` continues each prompt of the batch (a ``(B, T)`` tensor of token ids, a
    list of 1-D tensors, or a tuple/list whose first item is one of those) by ``max_new_tokens``
    tokens from ``service`` and returns the list of the full sequences. Every token is one query:
    past the budget, :class:`~lightning_dp.PrivacyBudgetExhausted` stops the run, and
    ``trainer.predict`` returns nothing; the sequences finished before it (whose tokens were paid
    for) are in :attr:`generated`, in order."""

    def __init__(self, service: Any, max_new_tokens: int) -> None:
        super().__init__()
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.service, self.max_new_tokens = service, max_new_tokens
        #: Every sequence finished so far, across predict runs.
        self.generated: list[Tensor] = []

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"PMixEDModule runs in one process: with {self.trainer.world_size} processes each would spend its "
                "own copy of the service's query budget. Use Trainer(devices=1)."
            )

    def predict_step(self, batch: Any, batch_idx: int) -> list[Tensor]:
        out = []
        for prompt in prompts_of(batch):
            out.append(self.service.generate(prompt.cpu(), self.max_new_tokens))
            self.generated.append(out[-1])
        return out


def prompts_of(batch: Any) -> list[Tensor]:
    """The prompts of a predict batch as 1-D token id tensors: rows of a ``(B, T)`` tensor, the
    first item of a ``TensorDataset`` batch, a list of 1-D tensors, or a Hugging Face batch
    (``input_ids`` with the ``attention_mask``'s padding removed, left or right)."""
    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        if mask is None:
            return list(ids)
        return [row[m.bool()] for row, m in zip(ids, torch.as_tensor(mask))]
    if isinstance(batch, Tensor) and batch.dim() in (1, 2):
        return list(batch) if batch.dim() == 2 else [batch]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() == 2:
        return list(batch[0])
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(p, Tensor) and p.dim() == 1 for p in batch):
        return list(batch)
    raise TypeError(
        f"PMixEDModule cannot find prompts in a {type(batch).__name__} batch: give (B, T) token ids, a list of 1-D "
        "tensors, or a dict with input_ids (and attention_mask)."
    )
