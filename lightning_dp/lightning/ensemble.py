"""PMixED's phase I: one member per disjoint partition of the private data, trained with a plain
Lightning Trainer. **The members are not private**: their weights memorise their partitions, and
must never leave the service that answers through :class:`~lightning_dp.PMixED`, whose sampled
tokens are what is private.

A record's partition is a fixed function of its id (a hash), so adding, removing or changing one
record changes exactly one member: the "replace one partition" relation PMixED's accounting
assumes. (Cutting a concatenated corpus into blocks and sharding the blocks, as the reference
code does, lets one record shift every block after it, and so every member.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["partition_of", "train_ensemble"]


def partition_of(key: Hashable, num_members: int) -> int:
    """The partition of the record with id ``key``: a stable hash (not Python's salted ``hash``).

    Example:
        >>> partition_of("line 17", 8) == partition_of("line 17", 8), 0 <= partition_of(3, 4) < 4
        (True, True)
    """
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_members


def train_ensemble(
    make_module: Callable[[int], pl.LightningModule],
    dataset: Dataset,
    num_members: int,
    batch_size: int = 16,
    keys: Optional[Sequence[Hashable]] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> list[pl.LightningModule]:
    """Train ``make_module(m)`` on partition ``m`` of ``dataset`` for each of ``num_members``
    members (records assigned by :func:`partition_of` of their id: ``keys[i]``, default the
    index), each with its own plain ``lightning.Trainer(**trainer_kwargs)``; returns the members."""
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    n = len(dataset)  # type: ignore[arg-type]
    ids = list(keys) if keys is not None else list(range(n))
    if len(ids) != n:
        raise ValueError(f"keys names {len(ids)} records for a dataset of {n}")
    parts: list[list[int]] = [[] for _ in range(num_members)]
    for index, key in enumerate(ids):
        parts[partition_of(key, num_members)].append(index)
    empty = [m for m, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(f"partitions {empty} of {num_members} are empty: use fewer members or more data.")
    rank_zero_warn(
        "train_ensemble: the members are fine-tuned WITHOUT differential privacy on their partitions; keep their "
        "weights inside the service. Only the tokens PMixED samples from them are private."
    )
    members = []
    for m, part in enumerate(parts):
        module = make_module(m)
        trainer = pl.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                                **(trainer_kwargs or {})})
        trainer.fit(module, DataLoader(Subset(dataset, part), batch_size=batch_size, shuffle=True))
        members.append(module)
    return members
