"""The two small interfaces between the Lightning adapters.

* :class:`StepGuard`: what a DP strategy asks before and after each private step. A budget
  callback (:class:`~lightning_dp.PrivacyBudget`) attaches one to the strategy; the strategy
  imports no callback.
* :class:`DPHost`: what the private step (:class:`~lightning_dp.lightning.private_step.PrivateStep`)
  needs from the Lightning strategy that owns it: the module, the precision plugin, device
  transfer, and how the processes share a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["AuditView", "BudgetView", "DPHost", "StepGuard", "StepView"]


class StepGuard(Protocol):
    """Decides whether private steps may run, and stops training when no more may."""

    def ensure_planned(self, trainer: pl.Trainer) -> None:
        """Plan (calibrate the noise, count the steps allowed) unless this fit already did: called
        when training starts, also in loops that run without the Trainer's callbacks (tuners)."""

    def ensure_step_allowed(self, trainer: pl.Trainer, sample_rate: float) -> None:
        """Raise unless one more private step at ``sample_rate`` (the rate the batch about to train
        was drawn with) is allowed."""

    def after_step(self, trainer: pl.Trainer) -> None:
        """Called right after a private step was recorded: stop the Trainer if no further step is
        allowed."""

    def verify_checkpoint(self, checkpoint: Mapping[str, Any], automatic_optimization: Optional[bool] = None) -> None:
        """Refuse a checkpoint being resumed whose ledger does not cover or was not written with
        its weights; called on the checkpoint as read from the file, before any hook changes it."""


class DPHost(Protocol):
    """A Lightning strategy that runs private steps."""

    @property
    def lightning_module(self) -> Optional[pl.LightningModule]: ...

    @property
    def precision_plugin(self) -> Any: ...

    @property
    def root_device(self) -> torch.device: ...

    def plain_batch_to_device(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Move a batch to the device through the user's transfer hooks."""

    def dp_shard(self) -> tuple[int, int]:
        """``(this process's rank, number of processes)`` for sampling."""

    def dp_all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` in place over processes."""

    @property
    def dp_adds_noise(self) -> bool:
        """Whether this process adds the step's noise (exactly one does)."""

    def dp_empty_step_output(self) -> Any:
        """What ``training_step`` returns on an empty draw."""

    @property
    def dp_supports_manual(self) -> bool:
        """Whether manual optimization is supported (on one device only)."""

    def pre_backward(self, closure_loss: Tensor) -> None: ...

    def post_backward(self, closure_loss: Tensor) -> None: ...


class StepView(Protocol):
    """What manual optimization (``manual.py``) uses of the private step that owns it."""

    noise_multiplier: Optional[float]
    grad_check: Optional[dict[str, Any]]

    @property
    def host(self) -> DPHost: ...

    @property
    def module(self) -> pl.LightningModule: ...

    def new_mechanism(self, params: Any) -> Any:
        """A :class:`~lightning_dp.mechanism.gaussian.GaussianMechanism` over ``params``."""

    def recorded(self, mechanism: Any, noise_multiplier: float, sample_rate: float) -> None:
        """Book one released private step."""


@runtime_checkable
class BudgetView(Protocol):
    """What callbacks read of a budget callback (the audit its delta) without importing it."""

    delta: float

    @property
    def epsilon_spent(self) -> float: ...


@runtime_checkable
class AuditView(Protocol):
    """What a budget's report reads of an audit callback without importing it."""

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Run the audit once (at the end of ``fit``) and return its result (``None``: none)."""
