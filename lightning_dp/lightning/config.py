"""The arguments of a DP strategy, validated once for :class:`~lightning_dp.DPStrategy` and
:class:`~lightning_dp.DPDDPStrategy` alike."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning_dp.mechanism.adaptive_clipping import AdaptiveClipping
from lightning_dp.mechanism.grads.engine import LossReduction
from lightning_dp.mechanism.grads.registry import ENGINES

__all__ = ["PrivacyConfig", "clipping_config"]


@dataclass(frozen=True)
class PrivacyConfig:
    """How each private step runs (see :class:`~lightning_dp.DPStrategy` for each field).

    Example:
        >>> PrivacyConfig(max_grad_norm=0.0)
        Traceback (most recent call last):
        ...
        ValueError: max_grad_norm must be a finite number > 0, got 0.0
    """

    max_grad_norm: float = 1.0
    noise_multiplier: Optional[float] = None
    max_physical_batch_size: Optional[int] = None
    secure_mode: bool = False
    loss_reduction: LossReduction = "mean"
    engine: str = "auto"
    check_per_sample_grads: bool = True
    replace_batch_norm: bool = False
    private_optimizers: Optional[tuple[int, ...]] = None
    seed: Optional[int] = None
    #: ``None``: a fixed clipping norm; else how it adapts (``clipping="adaptive"``).
    adaptive_clipping: Optional[AdaptiveClipping] = None
    #: ``"example"`` or ``"user"`` (:mod:`lightning_dp.mechanism.user_sampling`).
    privacy_unit: str = "example"
    #: With ``privacy_unit="user"``: each example's user (a sequence, or a callable on the dataset;
    #: ``None``: the dataset's ``user_ids``), and the public cap on a user's examples per draw.
    user_ids: Any = None
    max_examples_per_user: Optional[int] = None

    def __post_init__(self) -> None:
        c = self.max_grad_norm
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {c!r}")
        object.__setattr__(self, "max_grad_norm", float(c))
        sigma = self.noise_multiplier
        if sigma is not None and not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma >= 0):
            raise ValueError(f"noise_multiplier must be a number >= 0 or None, got {sigma!r}")
        if sigma is not None:
            object.__setattr__(self, "noise_multiplier", float(sigma))
        k = self.max_physical_batch_size
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
            raise ValueError(f"max_physical_batch_size must be a positive int or None, got {k!r}")
        if self.engine != "auto" and self.engine not in ENGINES:
            raise ValueError(f"engine must be 'auto' or one of {list(ENGINES)}, got {self.engine!r}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        for name in ("secure_mode", "check_per_sample_grads", "replace_batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        private = self.private_optimizers
        if private is not None:
            if not (
                isinstance(private, Sequence) and not isinstance(private, str) and len(private) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in private)
                and len(set(private)) == len(private)
            ):
                raise ValueError(
                    "private_optimizers must be None (all optimizers are private) or a non-empty list of distinct "
                    f"optimizer indices >= 0, in configure_optimizers' order; got {private!r}"
                )
            object.__setattr__(self, "private_optimizers", tuple(private))
        if self.adaptive_clipping is not None and not isinstance(self.adaptive_clipping, AdaptiveClipping):
            raise ValueError(f"adaptive_clipping must be an AdaptiveClipping or None, got {self.adaptive_clipping!r}")
        if self.privacy_unit not in ("example", "user"):
            raise ValueError(f"privacy_unit must be 'example' or 'user', got {self.privacy_unit!r}")
        cap = self.max_examples_per_user
        if self.privacy_unit == "user":
            if not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
                raise ValueError(
                    "privacy_unit='user' needs max_examples_per_user=k (an int >= 1): the most examples one user "
                    f"contributes to a batch, a public cap fixed in advance; got {cap!r}"
                )
            if k is not None and k < cap:
                raise ValueError(
                    f"max_physical_batch_size={k} is below max_examples_per_user={cap}: a physical batch must hold a "
                    "whole user (one user's contribution is clipped as one)."
                )
            if self.user_ids is not None and not callable(self.user_ids):
                object.__setattr__(self, "user_ids", tuple(self.user_ids))  # a one-shot iterator survives reloads
        elif self.user_ids is not None or cap is not None:
            raise ValueError("user_ids and max_examples_per_user apply to privacy_unit='user'; pass it, or remove them.")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ValueError(f"seed must be None (OS entropy, the safe default) or an int, got {self.seed!r}")


def clipping_config(clipping: str, target_quantile: float, clipping_learning_rate: float,
                    count_noise: Optional[float]) -> Optional[AdaptiveClipping]:
    """The strategies' ``clipping=`` arguments as an :class:`AdaptiveClipping` (or ``None``)."""
    if clipping == "flat":
        return None
    if clipping != "adaptive":
        raise ValueError(f"clipping must be 'flat' or 'adaptive', got {clipping!r}")
    return AdaptiveClipping(target_quantile, clipping_learning_rate, count_noise)
