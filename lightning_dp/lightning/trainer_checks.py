"""What DP training refuses in a Trainer and a LightningModule before anything runs, and the
small rules of a private step's outputs (its loss, its optimizer closure)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_dp.lightning.config import PrivacyConfig
from lightning_dp.lightning.interfaces import DPHost

__all__ = ["check_manual_optimization", "check_trainer", "released_closure", "remove_warning_filter", "step_loss"]


def released_closure(optimizer: Any, result: Any) -> Callable[[], Any]:
    """The closure handed to the optimizer after the release: it returns the closure's result
    and refuses a second evaluation (each would be a separate release of private data)."""
    calls = 0

    def closure() -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError(
                f"{type(optimizer).__name__} evaluates its closure more than once per step (like LBFGS); each "
                "evaluation would be a separate release of private data. Use a first-order optimizer with DP training."
            )
        return result

    return closure


def check_trainer(trainer: pl.Trainer, config: PrivacyConfig, host: DPHost, module: pl.LightningModule,
                   name: str) -> None:
    if module.automatic_optimization:
        if config.private_optimizers is not None:
            raise ValueError(
                f"{name}(private_optimizers={list(config.private_optimizers)}) applies to manual optimization "
                "(automatic_optimization = False); with automatic optimization the one optimizer is private. Remove "
                "private_optimizers."
            )
    else:
        check_manual_optimization(config, host, name)
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported with DP: gradient "
            "accumulation breaks Poisson sampling (each accumulated batch would be a separate draw normalised twice). "
            f"For large logical batches in bounded memory use a larger DataLoader batch_size with "
            f"{name}(max_physical_batch_size=...)."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the already noised, averaged "
            f"gradient, not each example's. Remove it and set {name}(max_grad_norm=...)."
        )
    if is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True):
        raise TypeError(
            f"{name} cannot train a training_step(self, dataloader_iter): it must see each Poisson-sampled "
            "batch, one step per batch, to clip, noise and account for it. Write training_step(self, batch, "
            "batch_idx)."
        )
    precision = host.precision_plugin
    if isinstance(precision, MixedPrecision) and precision.scaler is not None:
        raise ValueError(
            "precision='16-mixed' uses a gradient scaler that DP-SGD's per-sample gradients bypass. Use "
            "precision='bf16-mixed' or '32-true'."
        )


def check_manual_optimization(config: PrivacyConfig, host: DPHost, name: str) -> None:
    if not host.dp_supports_manual:
        raise ValueError(
            f"{name} does not support manual optimization (automatic_optimization = False): use DPStrategy on one "
            "device, or automatic optimization."
        )
    ignored = [f"{field}={value!r}" for field, value, default in (
        ("engine", config.engine, "auto"), ("loss_reduction", config.loss_reduction, "mean")) if value != default]
    if ignored:
        rank_zero_warn(
            f"{name}({', '.join(ignored)}) has no effect with manual optimization: the per-example gradients come "
            "from the per-example loss given to manual_backward (shape (batch size,)), differentiated exactly by "
            "autograd."
        )
    if config.privacy_unit == "user":
        raise ValueError(f"{name}(privacy_unit='user') is not supported with manual optimization yet.")
    if config.adaptive_clipping is not None:
        raise ValueError(
            f"{name}(clipping='adaptive') is not supported with manual optimization: use a fixed max_grad_norm."
        )
    if config.max_physical_batch_size is not None:
        raise ValueError(
            f"{name}(max_physical_batch_size={config.max_physical_batch_size}) is not supported with manual "
            "optimization: training_step takes each Poisson batch whole, as it steps the optimizers itself. Remove "
            "max_physical_batch_size, or lower the DataLoader's batch_size."
        )


def step_loss(output: Any) -> Optional[Tensor]:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise TypeError(f"training_step must return a loss tensor, a dict with 'loss', or None; got {type(output).__name__}")


def remove_warning_filter(pattern: str) -> None:
    for entry in list(warnings.filters):
        if entry[0] == "ignore" and entry[1] is not None and entry[1].pattern == pattern:
            warnings.filters.remove(entry)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]  # as filterwarnings() does
            break
