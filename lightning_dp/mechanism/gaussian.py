"""The arithmetic of one DP-SGD step, in one place.

For each physical chunk: clip every example's gradient to norm ``C`` and add it to a running
sum. At the step: add Gaussian noise ``N(0, (sigma*C)^2)`` to the sum once, divide by the
*expected* batch size ``q*N`` (the realised size is private), and hand the result to the
user's optimizer as ``param.grad``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_dp.mechanism.exact import exact_arithmetic
from lightning_dp.mechanism.grads.engine import Materialized, PerExampleGrads, clipping_sq_norms
from lightning_dp.mechanism.streams import RandomStreams


def _sum_dtype(p: Tensor) -> torch.dtype:
    """float64 for float64 parameters, float32 for every other floating dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class GaussianMechanism:
    """Clip, sum, noise and normalise per-example gradients.

    Args:
        params: the trainable parameters, in a fixed order.
        max_grad_norm: the clipping norm ``C``.
        secure_mode: draw noise from a generator freshly seeded with OS entropy at each step,
            summing ``2n = 4`` Gaussians (Holohan et al. 2021, as Opacus does) to blunt
            floating-point attacks on the noise's low bits.
        streams: the fit's random streams; the noise comes from ``streams.noise(device)``.
            ``None``: a fresh stream seeded from OS entropy. Never torch's global generator,
            which ``seed_everything`` would replay (see :mod:`lightning_dp.mechanism.streams`).

    **Every example's influence is bounded, whatever its values.** Norms are computed in
    float32 and, where that overflows (a finite but huge feature), again in float64; an
    example whose gradient is still not finite (a NaN or inf in its data) contributes exactly
    zero, a rule that depends on that example alone. :attr:`dropped` counts them.

    Example:
        >>> w = nn.Parameter(torch.zeros(2))
        >>> mech = GaussianMechanism([w], max_grad_norm=1.0)
        >>> mech.add([torch.tensor([[3.0, 4.0], [0.3, 0.4], [float("nan"), 1.0]])])  # norms, before clipping
        tensor([5.0000, 0.5000,    nan])
        >>> mech.dropped  # the NaN example contributes nothing
        1
        >>> mech.release(noise_multiplier=0.0, expected_batch_size=2.0)
        >>> w.grad
        tensor([0.4500, 0.6000])
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        max_grad_norm: float,
        secure_mode: bool = False,
        streams: Optional[RandomStreams] = None,
    ) -> None:
        self.params = list(params)
        self.max_grad_norm = float(max_grad_norm)
        self.secure_mode = secure_mode
        self.streams = streams if streams is not None else RandomStreams(seed=None, rank=0, start_step=0, fit_index=0)
        self._sums: list[Optional[Tensor]] = [None] * len(self.params)
        #: sum over examples of (1[not clipped] - 1/2), for adaptive clipping's count.
        self._centered_count: Optional[Tensor] = None
        self.examples_seen = 0
        #: Examples whose gradient was not finite, dropped (contributing zero), over this object's life.
        self.dropped = 0

    def add(self, grads: PerExampleGrads | Sequence[Optional[Tensor]], units: Optional[Sequence[int]] = None) -> Tensor:
        """Clip each example's gradient (aligned with ``params``) to norm ``C`` and add it to
        the running sum. Returns the unclipped per-example norms (NaN for dropped examples).

        With ``units`` (user-level privacy: ``units[u]`` consecutive examples belong to user
        ``u``), each user's summed gradient is clipped instead, and the norms are per user."""
        if not isinstance(grads, PerExampleGrads):
            present = [g for g in grads if g is not None]
            grads = Materialized(list(grads), present[0].shape[0] if present else 0)
        with exact_arithmetic():  # a bf16 or TF32 product would round a contribution past C
            return self._add(grads, units)

    def _add(self, grads: PerExampleGrads, units: Optional[Sequence[int]]) -> Tensor:
        if units is not None:
            grads = grads.grouped(units)
        if grads.batch_size == 0:
            return torch.zeros(0)
        sq = clipping_sq_norms(grads)
        bad = ~torch.isfinite(sq)
        any_bad = bool(bad.any())
        if any_bad:
            grads.drop(bad)
            self.dropped += int(bad.sum())
            sq = torch.where(bad, torch.zeros((), dtype=sq.dtype, device=sq.device), sq)
        norms = sq.clamp(min=0.0).sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        if any_bad:
            factor = torch.where(bad, torch.zeros((), dtype=factor.dtype, device=factor.device), factor)
            norms = torch.where(bad, torch.full((), math.nan, dtype=norms.dtype, device=norms.device), norms)
        # Adaptive clipping's count: an example whose gradient was not clipped counts 1, others 0
        # (a dropped one too), centred so that one example moves the sum by at most 1/2.
        kept = (norms <= self.max_grad_norm) & ~bad if any_bad else norms <= self.max_grad_norm
        centered = kept.to(torch.float64).sum() - 0.5 * grads.batch_size
        self._centered_count = centered if self._centered_count is None else self._centered_count + centered
        for i, clipped in enumerate(grads.weighted_sum(factor)):
            if clipped is not None:
                # One accumulation dtype per parameter, whatever the engine returned (ghost clipping
                # returns float64 where it computed an example exactly): every rank's sums then
                # all-reduce alike, and bf16/fp16 parameters never round the running sum to 8 bits.
                clipped = clipped.to(_sum_dtype(self.params[i]))
                before = self._sums[i]
                self._sums[i] = clipped if before is None else before + clipped
        self.examples_seen += grads.batch_size
        return norms.float()

    @torch.no_grad()
    def release(
        self,
        noise_multiplier: float,
        expected_batch_size: float,
        add_noise: bool = True,
        all_reduce: Optional[Callable[[list[Tensor]], None]] = None,
        count_noise_std: Optional[float] = None,
    ) -> Optional[float]:
        """Write ``(sum + N(0, (sigma*C)^2)) / expected_batch_size`` into each ``param.grad``
        and reset the sum. Runs once per step, also when the batch was empty.

        With several processes, each passes ``all_reduce`` (an in-place sum over processes)
        and exactly one passes ``add_noise=True``: the noise enters the global sum once.

        With ``count_noise_std`` (adaptive clipping), the centred count of unclipped examples
        is released too, with ``N(0, count_noise_std^2)``, and returned."""
        std = noise_multiplier * self.max_grad_norm
        totals: list[Tensor] = []
        for i, p in enumerate(self.params):
            held = self._sums[i]
            total = held if held is not None else torch.zeros_like(p, dtype=_sum_dtype(p))
            if add_noise and std > 0:
                total = total + self._noise(std, p)
            totals.append(total)
        count: Optional[Tensor] = None
        if count_noise_std is not None:
            like = self.params[0]
            count = torch.zeros((), dtype=torch.float64, device=like.device)
            if self._centered_count is not None:
                count = count + self._centered_count.to(like.device)
            if add_noise and count_noise_std > 0:
                count = count + self._noise(float(count_noise_std), count)
            totals.append(count)
        if all_reduce is not None:
            all_reduce(totals)
        for p, total in zip(self.params, totals):
            p.grad = (total / expected_batch_size).to(p.dtype)
        self.reset()
        return None if count is None else float(totals[-1])

    def _noise(self, std: float, like: Tensor) -> Tensor:
        if not self.secure_mode:
            generator = self.streams.noise(like.device)
            return torch.normal(0.0, std, size=like.shape, device=like.device, dtype=like.dtype, generator=generator)
        # A generator freshly seeded with OS entropy for every tensor; and a sum of 4 draws at
        # std, halved: the same N(0, std^2) with the low bits of any single draw hidden
        # (Holohan et al. 2021, Section 5.1).
        generator = torch.Generator(device=like.device).manual_seed(secrets.randbits(63))
        total = torch.zeros_like(like)
        for _ in range(4):
            total += torch.normal(0.0, std, size=like.shape, device=like.device, dtype=like.dtype, generator=generator)
        return total / 2

    def reset(self) -> None:
        self._sums = [None] * len(self.params)
        self._centered_count = None
        self.examples_seen = 0


