"""The interface every per-sample gradient engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

LossReduction = Literal["mean", "sum"]

#: Runs the user's training step on a batch and returns ``(output, loss)``.
StepFn = Callable[[Any], tuple[Any, Tensor]]


class PerExampleGrads(ABC):
    """The per-example gradients of a chunk, as the DP step uses them: their norms, and sums
    weighted per example. An engine may answer both without ever forming one gradient per
    example (ghost clipping)."""

    batch_size: int

    @abstractmethod
    def sq_norms(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Shape ``(batch_size,)``: each example's squared gradient norm over all parameters,
        accumulated in ``dtype``. In float32 a huge but finite gradient can overflow to inf;
        in float64 every finite float32 gradient's squared norm is finite (the mechanism asks
        for float64 only when float32 overflowed)."""

    @abstractmethod
    def weighted_sum(self, weights: Tensor) -> list[Optional[Tensor]]:
        """For each parameter, ``sum_i weights[i] * grad_i`` (``None`` where all are zero)."""

    @abstractmethod
    def drop(self, rows: Tensor) -> None:
        """Make the examples where the bool mask ``rows`` is true contribute exactly zero to
        every later :meth:`weighted_sum`, even if their gradients hold NaN or inf (``0 * nan``
        is NaN, so a zero weight alone would not do). Never modifies tensors in place: they may
        be the user's batch."""

    @abstractmethod
    def grouped(self, units: Sequence[int]) -> PerExampleGrads:
        """The gradients of groups of consecutive examples, summed (``units[u]`` examples in
        group ``u``): a user's contribution under user-level privacy, whose norm is the norm
        of the sum, not the sum of the norms."""


def unit_index(units: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """For each example, the index of its group."""
    counts = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(units), device=device), counts)


def group_rows(t: Tensor, units: Sequence[int]) -> Tensor:
    """``t``'s rows summed per group (at least float32)."""
    wide = t if t.dtype in (torch.float32, torch.float64) else t.float()
    out = torch.zeros(len(units), *t.shape[1:], dtype=wide.dtype, device=t.device)
    return out.index_add_(0, unit_index(units, t.device), wide)


class Materialized(PerExampleGrads):
    """Per-example gradients held as tensors of shape ``(batch_size, *param.shape)``."""

    def __init__(self, grads: list[Optional[Tensor]], batch_size: int) -> None:
        self.grads = grads
        self.batch_size = batch_size

    def sq_norms(self, dtype: torch.dtype = torch.float32) -> Tensor:
        present = [g for g in self.grads if g is not None]
        sq = torch.zeros(self.batch_size, dtype=dtype, device=present[0].device if present else None)
        for g in present:
            sq += torch.linalg.vector_norm(g.reshape(self.batch_size, -1), dim=1, dtype=dtype).square()
        return sq

    def weighted_sum(self, weights: Tensor) -> list[Optional[Tensor]]:
        out: list[Optional[Tensor]] = []
        for g in self.grads:
            if g is None:
                out.append(None)
                continue
            # bf16/fp16 gradients are summed in float32: an 8-bit mantissa would round the clipped
            # sum by far more than one example's contribution.
            wide = g if g.dtype in (torch.float32, torch.float64) else g.float()
            out.append(torch.einsum("i,i...->...", weights.to(wide.dtype), wide))
        return out

    def drop(self, rows: Tensor) -> None:
        self.grads = [None if g is None else zero_rows(g, rows) for g in self.grads]

    def grouped(self, units: Sequence[int]) -> Materialized:
        if sum(units) != self.batch_size:
            raise PerSampleGradientError(f"{sum(units)} examples in the users' groups, {self.batch_size} gradients")
        return Materialized([None if g is None else group_rows(g, units) for g in self.grads], len(units))


def clipping_sq_norms(grads: PerExampleGrads) -> Tensor:
    """The squared norms clipping uses: float32, and float64 where float32 overflowed (a huge but
    finite gradient). Entries that stay non-finite are examples with NaN or inf gradients."""
    sq = grads.sq_norms()
    if not bool(torch.isfinite(sq).all()):
        sq = grads.sq_norms(torch.float64)
    return sq


def zero_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t`` with its leading-dimension entries where ``rows`` is true replaced by zeros (a new
    tensor: NaN and inf included)."""
    mask = rows.to(t.device).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(mask, torch.zeros((), dtype=t.dtype, device=t.device), t)


class PerSampleGradientError(RuntimeError):
    """An engine produced per-sample gradients that cannot be right (the strategy stops)."""


class PerSampleGradEngine(ABC):
    """Computes one gradient per example for a chunk of examples.

    Life cycle: :meth:`attach` once per ``fit``; then, for each physical chunk, the strategy
    hands :meth:`compute` a function that runs the user's ``training_step``; :meth:`detach`
    at teardown.
    """

    name: ClassVar[str]

    def unsupported(self, module: nn.Module) -> list[str]:
        """Layers of ``module`` this engine cannot handle, each with what to change."""
        return []

    @abstractmethod
    def attach(self, module: nn.Module) -> None:
        """Prepare ``module`` (e.g. register hooks)."""

    @abstractmethod
    def detach(self) -> None:
        """Undo :meth:`attach`; safe to call when not attached."""

    @abstractmethod
    def compute(
        self,
        step: StepFn,
        batch: Any,
        params: Sequence[nn.Parameter],
        batch_size: int,
        loss_reduction: LossReduction,
    ) -> tuple[Any, Tensor, PerExampleGrads]:
        """Run ``step`` on ``batch`` (``batch_size`` examples) and return the step's output,
        its loss (detached), and each example's gradient of its own loss with respect to
        ``params``.

        Must leave ``param.grad`` empty: the summed, unclipped gradient is not private.
        """

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run plain autograd without the engine (the check's reference passes)."""
        yield


def param_names(module: nn.Module) -> dict[nn.Parameter, str]:
    return {p: n for n, p in module.named_parameters()}


@contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """Turn a LightningModule's ``self.log``/``self.log_dict`` into no-ops: for passes of
    ``training_step`` that are not the step itself (the check, the per-example vmap).
    Nests: whatever ``log`` was patched in before is put back afterwards."""
    if not hasattr(module, "log"):
        yield
        return
    saved = {k: vars(module)[k] for k in ("log", "log_dict") if k in vars(module)}
    module.log = lambda *a, **k: None  # type: ignore[method-assign,assignment]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                setattr(module, k, saved[k])
            else:
                delattr(module, k)


@contextmanager
def metrics_kept(module: nn.Module) -> Iterator[None]:
    """Put every ``torchmetrics`` metric inside ``module`` back as it was afterwards: passes of
    ``training_step`` that are not the step itself (the check's, a per-example engine's) must not
    add their batches to the metrics the user accumulates over the epoch."""
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is a dependency, but keep the engines usable without it
        yield
        return
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {k: v.clone() if isinstance(v, Tensor) else [t.clone() for t in v] if isinstance(v, list) else v
                     for k, v in m.metric_state.items()}
            saved.append((m, state, m._update_count, m._computed, m._forward_cache))
    try:
        yield
    finally:
        for m, state, count, computed, cache in saved:
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count, m._computed, m._forward_cache = count, computed, cache
