"""Per-sample gradients from Opacus's module hooks (``GradSampleHooks``).

Opacus infers each layer's batch dimension from the activations it sees, so a layer applied
to a tensor without the batch dimension (``pos_emb(torch.arange(T))``) gets per-"sample"
gradients along the wrong axis: a crash when ``T`` differs from the batch size, silently wrong
values when it equals it. This engine therefore verifies on every chunk that each parameter
has exactly one gradient row per example, and the strategy's start-of-fit check compares its
output with plain backward passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

from opacus.grad_sample import GradSampleHooks
import torch
from torch import Tensor, nn

from lightning_dp.mechanism.grads.engine import (
    LossReduction,
    Materialized,
    PerExampleGrads,
    PerSampleGradEngine,
    PerSampleGradientError,
    StepFn,
    param_names,
)

# Opacus registers full backward hooks on every layer; torch warns when the first layer's input
# needs no gradient, which is the normal case for data and says nothing about correctness.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")


class OpacusHooksEngine(PerSampleGradEngine):
    """Opacus's per-layer grad samplers, with functorch for layers Opacus has no sampler for."""

    name = "hooks"

    def __init__(self, loss_reduction: LossReduction = "mean") -> None:
        self.loss_reduction = loss_reduction
        self._hooks: Optional[GradSampleHooks] = None
        self._names: dict[nn.Parameter, str] = {}

    def attach(self, module: nn.Module) -> None:
        if self._hooks is not None:
            return  # fit, then fit again on the same strategy: hooks are already there
        # Opacus undoes a mean's 1/n on each layer's backprops, with the n *it infers* for that
        # layer: the very guess that can go wrong. compute() verifies every layer's n against
        # the known chunk size, so the scaling stays right wherever the result is used.
        self._hooks = GradSampleHooks(module, batch_first=True, loss_reduction=self.loss_reduction, strict=False)
        self._names = param_names(module)

    def detach(self) -> None:
        if self._hooks is not None:
            module = self._hooks._module
            self._hooks.cleanup()
            self._hooks = None
            for m in module.modules():  # what a failed backward leaves behind on the layers
                for attr in ("activations", "max_batch_len"):
                    if attr in vars(m):
                        delattr(m, attr)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        assert self._hooks is not None
        self._hooks.disable_hooks()
        try:
            yield
        finally:
            self._hooks.enable_hooks()

    def unsupported(self, module: nn.Module) -> list[str]:
        problems = []
        for name, m in module.named_modules():
            if not any(p.requires_grad for p in m.parameters()):
                continue
            label = f"{name or '<root>'} ({type(m).__name__})"
            if type(m) in (nn.LSTM, nn.GRU, nn.RNN):
                problems.append(
                    f"{label}: Opacus's hooks cannot compute per-sample gradients through fused recurrent "
                    f"layers; use engine='functorch' (or 'auto'), or the drop-in opacus.layers.DP{type(m).__name__}."
                )
            elif type(m) is nn.MultiheadAttention:
                problems.append(
                    f"{label}: Opacus's hooks cannot compute per-sample gradients through "
                    "nn.MultiheadAttention's fused kernels; use engine='functorch' (or 'auto'), or the "
                    "drop-in opacus.layers.DPMultiheadAttention."
                )
        return problems

    def compute(
        self, step: StepFn, batch: Any, params: Sequence[nn.Parameter], batch_size: int, loss_reduction: LossReduction
    ) -> tuple[Any, Tensor, PerExampleGrads]:
        assert self._hooks is not None, "engine used before attach()"
        if loss_reduction != self.loss_reduction:
            raise ValueError(f"this engine was attached for loss_reduction={self.loss_reduction!r}")
        output, loss = step(batch)
        return output, loss.detach(), Materialized(self._backward(loss, params, batch_size), batch_size)

    def _backward(self, loss: Tensor, params: Sequence[nn.Parameter], batch_size: int) -> list[Optional[Tensor]]:
        loss.backward()
        out: list[Optional[Tensor]] = []
        try:
            for p in params:
                gs: Optional[Tensor] = getattr(p, "grad_sample", None)
                if isinstance(gs, list):  # several backward passes accumulated (not ours to merge)
                    gs = torch.stack(gs).sum(dim=0)
                if gs is None:
                    if p.grad is not None:
                        raise PerSampleGradientError(
                            f"Parameter {self._names.get(p, '?')!r} received a gradient but the "
                            f"'{self.name}' engine computed no per-sample gradient for it (a parameter "
                            "used outside an nn.Module layer Opacus can hook). Training it would leak "
                            "the unclipped gradient, so DP training stops here."
                        )
                    out.append(None)
                    continue
                if gs.shape[0] != batch_size or gs.shape[1:] != p.shape:
                    raise PerSampleGradientError(
                        f"The '{self.name}' engine returned per-sample gradients of shape "
                        f"{tuple(gs.shape)} for parameter {self._names.get(p, '?')!r} on a chunk of "
                        f"{batch_size} examples; expected {(batch_size, *p.shape)}. Opacus guessed the "
                        "batch dimension from a tensor without one (e.g. pos_emb(torch.arange(T)))."
                    )
                out.append(gs.to(p.dtype))
        finally:
            for p in params:
                p.grad = None  # the plain summed gradient is not private: never let it reach a step
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None
        return out
