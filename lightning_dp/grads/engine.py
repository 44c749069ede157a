"""The interface every per-sample gradient engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

LossReduction = Literal["mean", "sum"]


class PerSampleGradEngine(ABC):
    """Computes one gradient per example for a chunk of examples.

    Life cycle: :meth:`attach` once per ``fit``, then for each physical chunk the strategy
    runs the user's ``training_step`` (the forward) and passes the loss to
    :meth:`per_sample_grads`; :meth:`detach` at teardown.
    """

    name: ClassVar[str]

    @abstractmethod
    def attach(self, module: nn.Module) -> None:
        """Prepare ``module`` (e.g. register hooks)."""

    @abstractmethod
    def detach(self) -> None:
        """Undo :meth:`attach`; safe to call when not attached."""

    @abstractmethod
    def per_sample_grads(
        self, loss: Tensor, params: Sequence[nn.Parameter], batch_size: int, loss_reduction: LossReduction
    ) -> list[Optional[Tensor]]:
        """Backpropagate ``loss`` (computed on ``batch_size`` examples) and return, for each of
        ``params``, a tensor of shape ``(batch_size, *param.shape)`` with each example's
        gradient of its own loss, or ``None`` where the parameter got no gradient.

        Must leave ``param.grad`` empty: the summed, unclipped gradient is not private.
        """

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run plain autograd without the engine (the check's reference passes)."""
        yield


def make_engine(name: str) -> PerSampleGradEngine:
    """Build the engine called ``name``."""
    from lightning_dp.grads.hooks import OpacusHooksEngine

    engines: dict[str, type[PerSampleGradEngine]] = {OpacusHooksEngine.name: OpacusHooksEngine}
    if name not in engines:
        raise ValueError(f"Unknown per-sample gradient engine {name!r}; available: {sorted(engines)}")
    return engines[name]()


def clear_grads(params: Sequence[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def param_names(module: nn.Module) -> dict[torch.nn.Parameter, str]:
    return {p: n for n, p in module.named_parameters()}
