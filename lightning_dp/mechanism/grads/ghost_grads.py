"""Ghost clipping's arithmetic: per-example norms and clipped sums of Linear and Embedding
layers from their inputs ``a`` and output gradients ``g``, without forming one gradient per
example, and never letting rounding carry an example past the clip.

For a Linear layer, example ``i``'s weight gradient is ``M_i = sum_t g_t a_t^T`` over its
positions ``t``; its squared norm is ``sum_{t,t'} (a_t . a_t')(g_t . g_t')`` (a ``T x T``
computation) and the clipped sum is one matrix product ``sum_i w_i M_i = (w g)^T a``. Both can
cancel: for a crafted example whose positions nearly cancel, the terms are far larger than the
result, and in floating point the norm can come out far too small and the product far off. So:

* the norm used is an **upper bound** on the true one: the computed Gram sum plus its worst-case
  rounding, ``kappa S^2`` with ``S = sum_t |a_t| |g_t|`` (:func:`gram_bound`);
* an example whose bound is small against ``S`` (cancellation, or rounding that could dominate
  its clipped contribution) is computed **exactly** instead: its ``M_i`` in float64, whose norm
  and contribution are then the same numbers;
* every product runs in at least float32 (bf16 activations are upcast), in IEEE float32 (no TF32
  or bf16 for float32 products) and with gradual underflow (:func:`exact_arithmetic`).

With these, the rounding of the released sum moves one example's contribution by at most
``1e-3 C`` (see :data:`EXACT_BELOW`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_dp.mechanism.exact import exact_arithmetic
from lightning_dp.mechanism.grads.engine import (
    PerExampleGrads,
    PerSampleGradientError,
    group_rows,
    unit_index,
    zero_rows,
)

__all__ = ["GhostGrads", "gram_bound"]

#: float32's unit roundoff; above this relative rounding slack of the norm bound (for T
#: positions), the Gram matrices are computed in float64.
_U32 = 2.0**-24
_MAX_SLACK = 1e-2
#: The released sum's rounding moves an example's contribution by at most ``gamma_T S w`` with
#: ``w = C / bound``; examples whose bound is below ``max(1 / (4 sqrt(T)), EXACT_BELOW * T u) S``
#: are computed exactly, so that this is at most ``1e-3 C``.
EXACT_BELOW = 1e3


def _wide(t: Tensor) -> Tensor:
    """At least float32 (bf16 and fp16 values are exact in float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def gram_bound(a: Optional[Tensor], g: Tensor, ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(bound, span)`` per example, float64: an upper bound on ``||sum_t g_t a_t^T||^2`` (a
    Linear layer; with ``ids`` instead of ``a``, an Embedding's, ``a_t`` one-hot) that no
    rounding pushes below the true value, and ``S = sum_t |a_t| |g_t|``.

    The rounding error of the computed sum is at most ``kappa S^2`` with
    ``kappa = 1.01 u (d_a + d_g + T + 2)`` (the dot products in the two Gram matrices, then row
    sums of ``T`` terms; the rows are added in float64). The slack is about ``kappa T`` of the
    norm for typical gradients; where float32's would exceed ``_MAX_SLACK``, the Gram matrices are
    computed in float64 (``u = 2^-53``)."""
    n, positions, d_g = g.shape
    d_a = 0 if a is None else a.shape[2]
    work = torch.float32
    if 1.01 * _U32 * (d_a + d_g + positions + 2) * positions > _MAX_SLACK:
        work = torch.float64
    with exact_arithmetic():  # the Grams, and the sums of their products, with gradual underflow
        bound, span = _gram_bound(a, g, ids, work)
        if work == torch.float32 and not bool(torch.isfinite(bound).all()):
            # A huge but finite example overflows float32's Gram: float64 holds every finite float32
            # square; only examples with NaN or inf values stay non-finite (and are dropped).
            bound, span = _gram_bound(a, g, ids, torch.float64)
    return bound, span


def _gram_bound(a: Optional[Tensor], g: Tensor, ids: Optional[Tensor], work: torch.dtype) -> tuple[Tensor, Tensor]:
    _, positions, d_g = g.shape
    d_a = 0 if a is None else a.shape[2]
    u = _U32 if work == torch.float32 else 2.0**-53
    eta = torch.finfo(work).tiny * torch.finfo(work).eps  # the smallest subnormal
    g_w = g.to(work)
    grams = torch.bmm(g_w, g_w.transpose(1, 2))
    g_rows = _row_norms(grams, d_g, u, eta)
    if a is None:
        assert ids is not None
        grams = grams.mul_((ids.unsqueeze(2) == ids.unsqueeze(1)).to(work))
        span = g_rows.sum(dim=1)
        a_sum = torch.full_like(span, float(positions))  # one-hot rows: norm 1 each
    else:
        a_w = a.to(work)
        a_grams = torch.bmm(a_w, a_w.transpose(1, 2))
        a_rows = _row_norms(a_grams, d_a, u, eta)
        grams = grams.mul_(a_grams)
        span = (a_rows * g_rows).sum(dim=1)
        a_sum = a_rows.sum(dim=1)
    computed = grams.sum(dim=2).to(torch.float64).sum(dim=1)
    kappa = 1.01 * u * (d_a + d_g + positions + 2)
    # Underflow, which kappa (a relative error) does not cover: below the smallest normal number a
    # product loses up to eta absolutely, so each Gram entry errs by up to d * eta and the sum of
    # their T^2 products by up to eta (d_g (sum |a_t|)^2 + d_a (sum |g_t|)^2 + T^2 (1 + d_a d_g eta)).
    # Found by review: gradients of ~1e-23 against inputs of ~1e18 were bounded at 0.8x their norm.
    g_sum = g_rows.sum(dim=1)
    underflow = 1.01 * eta * (d_g * a_sum.square() + d_a * g_sum.square() + positions**2 * (1.0 + d_a * d_g * eta))
    return computed.clamp(min=0.0) + kappa * span.square() + underflow, span


def _row_norms(grams: Tensor, d: int, u: float, eta: float) -> Tensor:
    """Each position's norm, float64, rounded up: an upper bound on the exact norm, read off the
    Gram matrix's diagonal (a second pass over the activations for their norms cost a tenth of
    the norms' time). Each diagonal entry is a computed sum of ``d`` squares, all non-negative,
    so in any order of summation (fused multiply-adds included) it is at least ``1 - gamma_d``
    times the exact one, less ``d eta / 2`` for squares that underflowed (a float32 entry of
    1e-24 squares to 0). Hence the factor ``1 + 2 (d + 2) u`` (twice the worst case, square root
    included) and the term ``sqrt(d eta)``."""
    diagonal = grams.diagonal(dim1=1, dim2=2).to(torch.float64).clamp(min=0.0)
    return diagonal.sqrt() * (1.0 + 2.0 * (d + 2) * u) + math.sqrt(d * eta)


def _exact_rows(bound: Tensor, span: Tensor, positions: int) -> Tensor:
    """The examples to compute exactly: bound small against S (see :data:`EXACT_BELOW`)."""
    ratio = max(1.0 / (4.0 * math.sqrt(positions)), EXACT_BELOW * positions * _U32)
    return bound < (ratio * span).square()


@dataclass
class _Linear:
    index: int
    a: Tensor  # (n, L, d_in)
    g: Tensor  # (n, L, d_out)
    transposed: bool  # weight stored (d_in, d_out) (transformers' Conv1D)
    shape: torch.Size
    bound: Optional[Tensor] = None  # float64 (n,)
    exact: dict[int, Tensor] = field(default_factory=dict)  # example -> its gradient, float64

    def plan(self) -> None:
        if self.bound is not None:
            return
        bound, span = gram_bound(self.a, self.g, None)
        for k in _exact_rows(bound, span, self.a.shape[1]).nonzero().flatten().tolist():
            spec = "li,lo->io" if self.transposed else "li,lo->oi"
            self.exact[k] = torch.einsum(spec, self.a[k].double(), self.g[k].double()).reshape(self.shape)
            bound[k] = self.exact[k].square().sum()
        self.bound = bound

    def weighted_sum(self, weights: Tensor) -> Tensor:  # under GhostGrads.weighted_sum's exact_arithmetic
        self.plan()
        g = self.g
        if self.exact:
            g = zero_rows(g, _mask(self.exact, g.shape[0], g.device))
        a, g = _wide(self.a), _wide(g)
        a = a.to(torch.promote_types(a.dtype, g.dtype))
        g = g.to(a.dtype)
        w = weights.to(a.dtype).view(-1, 1, 1)
        if a.shape[-1] < g.shape[-1]:  # weight the narrower of the two (sum_i w_i g_i^T a_i either way)
            a = a * w
        else:
            g = g * w
        flat_a, flat_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out = (flat_a.t() @ flat_g if self.transposed else flat_g.t() @ flat_a).reshape(self.shape)
        return _plus_exact(out, self.exact, weights)


@dataclass
class _Embedding:
    index: int
    ids: Tensor  # (n, L)
    g: Tensor  # (n, L, d)
    rows: int
    bound: Optional[Tensor] = None
    exact: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # example -> (rows, gradient rows)

    def plan(self) -> None:
        if self.bound is not None:
            return
        bound, span = gram_bound(None, self.g, self.ids)
        for k in _exact_rows(bound, span, self.ids.shape[1]).nonzero().flatten().tolist():
            unique, where = torch.unique(self.ids[k], return_inverse=True)
            summed = torch.zeros(len(unique), self.g.shape[-1], dtype=torch.float64, device=self.g.device)
            self.exact[k] = (unique, summed.index_add_(0, where, self.g[k].double()))
            bound[k] = self.exact[k][1].square().sum()
        self.bound = bound

    def weighted_sum(self, weights: Tensor) -> Tensor:
        self.plan()
        g = self.g
        if self.exact:
            g = zero_rows(g, _mask(self.exact, g.shape[0], g.device))
        g = _wide(g)
        wg = (g * weights.to(g.dtype).view(-1, 1, 1)).reshape(-1, g.shape[-1])
        out = torch.zeros(self.rows, g.shape[-1], dtype=wg.dtype, device=g.device).index_add_(0, self.ids.reshape(-1), wg)
        if not self.exact:
            return out
        out = out.double()
        for k, (unique, summed) in self.exact.items():
            out.index_add_(0, unique, summed * float(weights[k]))
        return out


def _pack(t: Tensor, units: Sequence[int]) -> Tensor:
    """``(n, L, ...)`` to ``(len(units), max(units) * L, ...)``: each group's rows side by side,
    zero-padded."""
    index = unit_index(units, t.device)
    starts = torch.cumsum(torch.as_tensor([0, *units[:-1]], device=t.device), 0)
    position = torch.arange(t.shape[0], device=t.device) - starts[index]
    out = torch.zeros(len(units), max(units), *t.shape[1:], dtype=t.dtype, device=t.device)
    out[index, position] = t
    return out.reshape(len(units), max(units) * t.shape[1], *t.shape[2:])


def _mask(rows: Iterable[int], n: int, device: torch.device) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[list(rows)] = True
    return mask


def _plus_exact(out: Tensor, exact: dict[int, Tensor], weights: Tensor) -> Tensor:
    if not exact:
        return out
    total = out.double()
    for k, grad in exact.items():
        total = total + grad * float(weights[k])
    return total


class GhostGrads(PerExampleGrads):
    """Per-example gradients kept as layer inputs and output gradients where possible, and as
    per-example gradients (``materialized``) elsewhere."""

    def __init__(self, batch_size: int, num_params: int) -> None:
        self.batch_size = batch_size
        self.num_params = num_params
        self.materialized: dict[int, Tensor] = {}  # param index -> (n, *shape)
        self.linear: list[_Linear] = []
        self.embedding: list[_Embedding] = []

    def add_materialized(self, index: int, grad: Tensor) -> None:
        self.materialized[index] = grad if index not in self.materialized else self.materialized[index] + grad

    def add_linear(self, index: int, a: Tensor, g: Tensor, transposed: bool, shape: torch.Size) -> None:
        self.linear.append(_Linear(index, a, g, transposed, shape))

    def add_embedding(self, index: int, ids: Tensor, g: Tensor, rows: int) -> None:
        self.embedding.append(_Embedding(index, ids, g, rows))

    def sq_norms(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Each example's squared gradient norm: exact (to rounding) for the materialised layers
        and the examples computed exactly, an upper bound that absorbs rounding for the others."""
        n = self.batch_size
        sq = torch.zeros(n, dtype=torch.float64, device=self._device())
        with exact_arithmetic():
            for g in self.materialized.values():
                sq += torch.linalg.vector_norm(g.reshape(n, -1), dim=1, dtype=torch.float64).square()
            for record in self._records():
                record.plan()
                assert record.bound is not None
                sq += record.bound
        return sq.to(dtype)

    def weighted_sum(self, weights: Tensor) -> list[Optional[Tensor]]:
        out: list[Optional[Tensor]] = [None] * self.num_params
        with exact_arithmetic():
            for i, g in self.materialized.items():
                wide = _wide(g)
                out[i] = torch.einsum("i,i...->...", weights.to(wide.dtype), wide)
            for record in self._records():
                out[record.index] = record.weighted_sum(weights)
        return out

    def drop(self, rows: Tensor) -> None:
        self.materialized = {i: zero_rows(g, rows) for i, g in self.materialized.items()}
        for record in self.linear:
            record.a, record.g = zero_rows(record.a, rows), zero_rows(record.g, rows)
            record.exact = {k: v for k, v in record.exact.items() if not bool(rows[k])}
            record.bound = None if record.bound is None else torch.where(rows.to(record.bound.device), 0.0, record.bound)
        for emb in self.embedding:
            emb.g = zero_rows(emb.g, rows)
            emb.exact = {k: v for k, v in emb.exact.items() if not bool(rows[k])}
            emb.bound = None if emb.bound is None else torch.where(rows.to(emb.bound.device), 0.0, emb.bound)

    def grouped(self, units: Sequence[int]) -> GhostGrads:
        """Each user's examples as one longer example: their positions side by side (padded with
        zeros, which add nothing to a Gram matrix or a sum), so a user's norm is that of the sum
        of their gradients, with the same bounds and exact rows as any example's."""
        if sum(units) != self.batch_size:
            raise PerSampleGradientError(f"{sum(units)} examples in the users' groups, {self.batch_size} gradients")
        out = GhostGrads(len(units), self.num_params)
        out.materialized = {i: group_rows(g, units) for i, g in self.materialized.items()}
        for r in self.linear:
            a, g = _pack(r.a, units), _pack(r.g, units)
            if a.shape[1] ** 2 <= a.shape[2] * g.shape[2]:
                out.linear.append(_Linear(r.index, a, g, r.transposed, r.shape))
            else:  # a user's many positions make the Gram larger than the gradient: form the gradient
                spec = "upi,upo->uio" if r.transposed else "upi,upo->uoi"
                grad = torch.einsum(spec, _wide(a), _wide(g).to(_wide(a).dtype)).reshape(len(units), *r.shape)
                out.add_materialized(r.index, grad)
        for e in self.embedding:
            ids, g = _pack(e.ids, units), _pack(e.g, units)
            if ids.shape[1] ** 2 <= e.rows * g.shape[2]:
                out.embedding.append(_Embedding(e.index, ids, g, e.rows))
            else:
                wide = _wide(g)
                flat = (ids + torch.arange(len(units), device=ids.device).unsqueeze(1) * e.rows).reshape(-1)
                grad = torch.zeros(len(units) * e.rows, g.shape[2], dtype=wide.dtype, device=g.device)
                out.add_materialized(e.index, grad.index_add_(0, flat, wide.reshape(-1, g.shape[2])).view(
                    len(units), e.rows, g.shape[2]))
        return out

    def _records(self) -> list[Union[_Linear, _Embedding]]:
        return [*self.linear, *self.embedding]

    def _device(self) -> Optional[torch.device]:
        for t in self.materialized.values():
            return t.device
        for record in self.linear:
            return record.a.device
        for emb in self.embedding:
            return emb.ids.device
        return None
