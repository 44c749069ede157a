"""The arithmetic of one DP-SGD step, in one place.

For each physical chunk: clip every example's gradient to norm ``C`` and add it to a running
sum. At the step: add Gaussian noise ``N(0, (sigma*C)^2)`` to the sum once, divide by the
*expected* batch size ``q*N`` (the realised size is private), and hand the result to the
user's optimizer as ``param.grad``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_dp.grads.engine import Materialized, PerExampleGrads


class GaussianMechanism:
    """Clip, sum, noise and normalise per-example gradients.

    Args:
        params: the trainable parameters, in a fixed order.
        max_grad_norm: the clipping norm ``C``.
        secure_mode: draw noise from a generator freshly seeded with OS entropy at each step,
            summing ``2n = 4`` Gaussians (Holohan et al. 2021, as Opacus does) to blunt
            floating-point attacks on the noise's low bits.

    Example:
        >>> w = nn.Parameter(torch.zeros(2))
        >>> mech = GaussianMechanism([w], max_grad_norm=1.0)
        >>> mech.add([torch.tensor([[3.0, 4.0], [0.3, 0.4]])])  # per-example norms, before clipping
        tensor([5.0000, 0.5000])
        >>> mech.release(noise_multiplier=0.0, expected_batch_size=2.0)
        >>> w.grad
        tensor([0.4500, 0.6000])
    """

    def __init__(self, params: Sequence[nn.Parameter], max_grad_norm: float, secure_mode: bool = False) -> None:
        self.params = list(params)
        self.max_grad_norm = float(max_grad_norm)
        self.secure_mode = secure_mode
        self._sums: list[Optional[Tensor]] = [None] * len(self.params)
        self.examples_seen = 0

    def add(self, grads: PerExampleGrads | Sequence[Optional[Tensor]]) -> Tensor:
        """Clip each example's gradient (aligned with ``params``) to norm ``C`` and add it to
        the running sum. Returns the unclipped per-example norms."""
        if not isinstance(grads, PerExampleGrads):
            present = [g for g in grads if g is not None]
            grads = Materialized(list(grads), present[0].shape[0] if present else 0)
        if grads.batch_size == 0:
            return torch.zeros(0)
        norms = grads.sq_norms().sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for i, clipped in enumerate(grads.weighted_sum(factor)):
            if clipped is not None:
                self._sums[i] = clipped if self._sums[i] is None else self._sums[i] + clipped
        self.examples_seen += grads.batch_size
        return norms

    @torch.no_grad()
    def release(
        self,
        noise_multiplier: float,
        expected_batch_size: float,
        add_noise: bool = True,
        all_reduce: Optional[Callable[[list[Tensor]], None]] = None,
    ) -> None:
        """Write ``(sum + N(0, (sigma*C)^2)) / expected_batch_size`` into each ``param.grad``
        and reset the sum. Runs once per step, also when the batch was empty.

        With several processes, each passes ``all_reduce`` (an in-place sum over processes)
        and exactly one passes ``add_noise=True``: the noise enters the global sum once."""
        std = noise_multiplier * self.max_grad_norm
        generator = None
        if self.secure_mode and add_noise:
            device = self.params[0].device if self.params else torch.device("cpu")
            generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        totals = []
        for i, p in enumerate(self.params):
            total = self._sums[i] if self._sums[i] is not None else torch.zeros_like(p)
            if add_noise and std > 0:
                total = total + _gaussian(std, p, generator, self.secure_mode)
            totals.append(total)
        if all_reduce is not None:
            all_reduce(totals)
        for p, total in zip(self.params, totals):
            p.grad = (total / expected_batch_size).to(p.dtype)
        self.reset()

    def reset(self) -> None:
        self._sums = [None] * len(self.params)
        self.examples_seen = 0


def _gaussian(std: float, like: Tensor, generator: Optional[torch.Generator], secure: bool) -> Tensor:
    if not secure:
        return torch.normal(0.0, std, size=like.shape, device=like.device, dtype=like.dtype, generator=generator)
    # Sum of 4 draws at std, halved: the same N(0, std^2) with the low bits of any single
    # draw hidden (Holohan et al. 2021, Section 5.1).
    total = torch.zeros_like(like)
    for _ in range(4):
        total += torch.normal(0.0, std, size=like.shape, device=like.device, dtype=like.dtype, generator=generator)
    return total / 2
