"""Lightning's strategy hooks, routed to the strategy's :class:`PrivateStep`.

One job: both :class:`~lightning_dp.DPStrategy` and :class:`~lightning_dp.DPDDPStrategy` put
:class:`RoutesPrivateStep` before their Lightning base class, so each hook does Lightning's own
work (``super()``) and the private part (the owned ``PrivateStep``), and the attributes users
read (``strategy.noise_multiplier``, ``strategy.history``, ``strategy.engine``, ...) read the
private step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.integrity import bind_checkpoint
from lightning_dp.lightning.config import PrivacyConfig
from lightning_dp.lightning.interfaces import StepGuard
from lightning_dp.lightning.private_step import PrivateStep
from lightning_dp.lightning.trainer_checks import released_closure
from lightning_dp.mechanism.grads.engine import LossReduction, PerSampleGradEngine
from lightning_dp.mechanism.sampling import PoissonBatch

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    _Base = Strategy
else:
    _Base = object

__all__ = ["RoutesPrivateStep"]


class RoutesPrivateStep(_Base):
    """Routes a Lightning strategy's hooks to the :class:`PrivateStep` it owns."""

    private: PrivateStep

    def _own_private_step(self, config: PrivacyConfig) -> None:
        self.private = PrivateStep(config, self, type(self).__name__)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ what users read
    @property
    def config(self) -> PrivacyConfig:
        return self.private.config

    @property
    def noise_multiplier(self) -> Optional[float]:
        """The noise multiplier in force (``None`` until a budget calibrates it)."""
        return self.private.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: Optional[float]) -> None:
        self.private.noise_multiplier = value

    @property
    def requested_noise_multiplier(self) -> Optional[float]:
        """The ``noise_multiplier`` argument (``None``: calibrated by the budget)."""
        return self.private.config.noise_multiplier

    @property
    def history(self) -> PrivacyHistory:
        """Every private step taken (the ledger a budget checkpoints)."""
        return self.private.history

    @history.setter
    def history(self, value: PrivacyHistory) -> None:
        self.private.history = value

    @property
    def budget(self) -> Optional[StepGuard]:
        """The guard attached by a :class:`~lightning_dp.PrivacyBudget`, if any."""
        return self.private.guard

    @budget.setter
    def budget(self, guard: Optional[StepGuard]) -> None:
        self.private.guard = guard

    @property
    def checking(self) -> bool:
        """True while ``training_step`` runs for a per-sample gradient check (the start-of-fit
        check and the spot checks, about one step in ``SPOT_CHECK_EVERY``) rather than to train:
        skip side effects such as an EMA update or appending to a list of losses then
        (``if not self.trainer.strategy.checking: ...``). Logging, metrics and the RNG are
        restored after a check by the strategy itself."""
        return self.private.checking

    @property
    def train_dataloader(self) -> Optional[DataLoader]:
        return self.private.train_dataloader

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate ``q`` of the training loader."""
        return self.private.sample_rate

    @property
    def engine(self) -> Optional[PerSampleGradEngine]:
        return self.private.engine

    @property
    def grad_check(self) -> Optional[dict[str, Any]]:
        return self.private.grad_check

    @property
    def last_draw(self) -> Optional[PoissonBatch]:
        return self.private.last_draw

    @property
    def non_finite_examples_total(self) -> int:
        return self.private.non_finite_examples_total

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm in force (with adaptive clipping: where it has moved)."""
        return self.private.clip_norm

    @property
    def max_physical_batch_size(self) -> Optional[int]:
        return self.private.config.max_physical_batch_size

    @property
    def secure_mode(self) -> bool:
        return self.private.config.secure_mode

    @property
    def loss_reduction(self) -> LossReduction:
        return self.private.config.loss_reduction

    @property
    def engine_name(self) -> str:
        return self.private.config.engine

    @property
    def check_per_sample_grads(self) -> bool:
        return self.private.config.check_per_sample_grads

    @property
    def private_optimizers(self) -> Optional[list[int]]:
        chosen = self.private.config.private_optimizers
        return None if chosen is None else list(chosen)

    @property
    def seed(self) -> Optional[int]:
        return self.private.config.seed

    def safety_checks(self) -> dict[str, Any]:
        """The facts behind the guarantee, as plain data (see :meth:`PrivateStep.safety_checks`)."""
        return self.private.safety_checks()

    # ------------------------------------------------------------------ DPHost
    def plain_batch_to_device(self, batch: Any, dataloader_idx: int = 0) -> Any:
        return super().batch_to_device(batch, None, dataloader_idx)

    # ------------------------------------------------------------------ Lightning's hooks
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        return self.private.device_batch(super().batch_to_device(batch, device, dataloader_idx))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        # Bind the ledger here, after every on_save_checkpoint hook: Lightning calls the callbacks'
        # before the module's, which may still drop weights (LoRA) the binding would otherwise cover.
        if self.private.config.adaptive_clipping is not None:
            checkpoint["lightning_dp"] = {"max_grad_norm": self.private.clip_norm}  # where adaptive clipping is
        bind_checkpoint(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint: dict[str, Any] = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        guard, module = self.private.guard, self.lightning_module
        if guard is not None:
            # Verify the file as written, before the module's on_load_checkpoint (which runs before
            # the callbacks') may change it.
            guard.verify_checkpoint(checkpoint, None if module is None else module.automatic_optimization)
        saved = checkpoint.get("lightning_dp") or {}
        if self.private.config.adaptive_clipping is not None and "max_grad_norm" in saved:
            self.private.clip_norm = float(saved["max_grad_norm"])
        return checkpoint

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        self.private.connect(model)

    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.private.validate(trainer)
        super().setup(trainer)
        if fitting:
            self.private.start_fit(trainer)

    def process_dataloader(self, dataloader: object) -> object:
        return self.private.process_dataloader(super().process_dataloader(dataloader))

    def on_train_start(self) -> None:
        super().on_train_start()
        self.private.on_train_start()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.pop("batch")
        return self.private.training_step(batch, args[1:], kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if not self.private.fitting:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        manual = self.private.manual
        if manual is not None:
            plain = super().backward

            def backward(loss: Tensor) -> None:
                plain(loss, optimizer, *args, **kwargs)

            manual.backward(closure_loss, backward)
            return closure_loss
        # The per-example backward passes already ran in training_step; keep the hooks' order.
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        private = self.private
        if not private.fitting or (private.manual is not None and not private.manual.is_private(optimizer)):
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # public: no clipping, no noise
        # The closure (training_step and backward under automatic optimization) and the DP release
        # run here, before the optimizer is called: an optimizer that ignores its closure, or
        # steps before evaluating it, then still only ever sees the released gradient.
        result = closure()
        if private.manual is not None:
            private.manual.release(optimizer)
        else:
            private.release()
        return super().optimizer_step(optimizer, released_closure(optimizer, result), model, **kwargs)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.private.fitting:
            self.private.on_train_end()

    def teardown(self) -> None:
        if self.private.fitting:
            self.private.teardown()
        super().teardown()
