"""What the Trainer plans: how many private steps a fit has taken and still plans, in words for
messages, and where a run's artefacts go."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

__all__ = ["artefact_dirs", "plan_text", "private_steps_progress"]


def private_steps_progress(trainer: pl.Trainer, max_steps: Optional[int] = None) -> tuple[float, float]:
    """(steps taken, steps still planned) in units of private steps, with ``max_steps`` instead
    of the Trainer's when given (a tuner shortens the Trainer's for its trials).

    With automatic optimization these are optimizer steps. With manual optimization
    ``global_step`` counts every optimizer's steps (a GAN's generator too) while the strategy
    takes one private step per batch, so they are batches: the planned epochs' batches, capped
    by ``max_steps`` (each batch takes at least its private step, so at most that many remain).
    """
    if max_steps is None:
        max_steps = trainer.max_steps
    if trainer.lightning_module.automatic_optimization:
        planned: float = trainer.estimated_stepping_batches
        if max_steps != trainer.max_steps:
            epoch_steps = math.ceil(trainer.num_training_batches)
            planned = math.inf if trainer.max_epochs in (None, -1) else epoch_steps * max(trainer.max_epochs, 1)
            planned = min(planned, max_steps) if max_steps != -1 else planned
        return trainer.global_step, planned - trainer.global_step
    batches: Any = trainer.fit_loop.epoch_loop.batch_progress
    per_epoch = trainer.num_training_batches
    left: float = math.inf
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch):
        left = (max(trainer.max_epochs, 1) - trainer.current_epoch) * per_epoch - batches.current.processed
    if max_steps != -1:
        left = min(left, max_steps - trainer.global_step)
    return batches.total.processed, max(left, 0)


def plan_text(trainer: pl.Trainer) -> str:
    """The Trainer's plan in words, e.g. ``"max_epochs=3, max_steps=100"``."""
    parts = []
    if trainer.max_epochs not in (None, -1):
        parts.append(f"max_epochs={trainer.max_epochs}")
    if trainer.max_steps != -1:
        parts.append(f"max_steps={trainer.max_steps}")
    if trainer.limit_train_batches not in (None, 1.0):
        parts.append(f"limit_train_batches={trainer.limit_train_batches}")
    return ", ".join(parts) or "no end set"


def artefact_dirs(trainer: Optional[pl.Trainer]) -> list[Path]:
    """Where a run's report goes: each logger's log directory (several loggers: each gets it),
    else the Trainer's default_root_dir."""
    if trainer is None:
        return []
    found: list[Path] = []
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if where is not None and Path(where) not in found:
            found.append(Path(where))
    return found or [Path(trainer.default_root_dir)]
