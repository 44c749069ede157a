"""Adaptive clipping: a clipping norm that follows a quantile of the gradient norms.

A good clipping norm ``C`` sits near a quantile of the per-example gradient norms, which move
during training and are private. Andrew, Thakkar, McMahan and Ramaswamy ("Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021; Opacus's ``AdaClipDPOptimizer``) estimate
the fraction of examples whose gradient was not clipped, privately, at every step, and move
``C`` geometrically towards the target quantile ``gamma``:

    b = (sum_i (1[||g_i|| <= C] - 1/2) + N(0, sigma_b^2)) / B + 1/2,    C <- C exp(-eta (b - gamma)).

The count is a second release about the same Poisson sample, so it is part of the mechanism:
each example moves the clipped gradient sum by at most ``C`` and the centred count by at most
1/2. With gradient noise ``sigma_g C`` and count noise ``sigma_b``, the pair is one Gaussian
mechanism on a sensitivity-1 query with noise multiplier ``z`` where
``z^-2 = sigma_g^-2 + (2 sigma_b)^-2`` (the paper's Theorem 1). So the accountant composes
sampled Gaussians at ``z``, the noise multiplier the user gives or the budget calibrates, and
the gradient gets ``sigma_g = (z^-2 - (2 sigma_b)^-2)^(-1/2) > z``: a little more noise than
with a fixed norm, paid for the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["AdaptiveClipping"]


@dataclass(frozen=True)
class AdaptiveClipping:
    """How the clipping norm adapts.

    Args:
        target_quantile: the fraction ``gamma`` of examples whose gradient should not be clipped.
        learning_rate: ``eta`` of the geometric update (the paper's 0.2).
        count_noise: ``sigma_b``, the standard deviation of the noise on the count of unclipped
            examples. ``None``: the paper's ``B / 20`` for an expected batch size ``B``, and at
            least the noise multiplier (so the gradient's noise grows by at most 15%).

    Example:
        >>> clip = AdaptiveClipping(target_quantile=0.5)
        >>> sigma_b = clip.count_std(expected_batch_size=256, noise_multiplier=1.0)
        >>> sigma_b, round(clip.gradient_noise_multiplier(1.0, sigma_b), 4)
        (12.8, 1.0008)
        >>> round(clip.next_norm(1.0, noisy_centered_count=64, expected_batch_size=256), 4)  # 75% unclipped
        0.9512
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"the clipping learning rate must be a finite number > 0, got {self.learning_rate!r}")
        if self.count_noise is not None and not (self.count_noise > 0 and math.isfinite(self.count_noise)):
            raise ValueError(f"count_noise must be a finite number > 0 or None, got {self.count_noise!r}")

    def count_std(self, expected_batch_size: float, noise_multiplier: float) -> float:
        """``sigma_b`` for this run (0 without noise: a non-private run releases the count too)."""
        if noise_multiplier == 0:
            return 0.0
        if self.count_noise is not None:
            return float(self.count_noise)
        return max(expected_batch_size / 20.0, noise_multiplier)

    def gradient_noise_multiplier(self, noise_multiplier: float, count_std: float) -> float:
        """``sigma_g``: the gradient's noise multiplier that, with the count's noise, makes one
        Gaussian mechanism of noise multiplier ``noise_multiplier`` (what the accountant composes)."""
        z = float(noise_multiplier)
        if z == 0 or math.isinf(z):
            return z
        remaining = z**-2 - (2.0 * count_std) ** -2
        if remaining <= 0:
            raise ValueError(
                f"Adaptive clipping's count noise sigma_b={count_std:g} is too small for noise_multiplier={z:g}: the "
                f"count alone would spend the whole step's budget (needs sigma_b > noise_multiplier / 2 = {z / 2:g}). "
                "Pass a larger count_noise (or leave it None)."
            )
        return remaining**-0.5

    def next_norm(self, norm: float, noisy_centered_count: float, expected_batch_size: float) -> float:
        """The clipping norm for the next step, from this step's noised centred count."""
        unclipped = noisy_centered_count / expected_batch_size + 0.5
        return float(norm * math.exp(-self.learning_rate * (unclipped - self.target_quantile)))
