"""Exact accounting of composed Gaussian mechanisms (no subsampling): Private Evolution's histograms.

``T`` adaptive releases of the Gaussian mechanism on queries of L2 sensitivity 1 with noise of
standard deviation ``sigma`` are together exactly ``mu``-Gaussian DP with ``mu = sqrt(T) / sigma``
(Dong, Roth and Su 2022, Corollary 3.3), and ``mu``-GDP is ``(epsilon, delta(epsilon))``-DP for
every ``epsilon`` with ``delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2)``
(Balle and Wang 2018). That curve is the tight one, not an approximation (unlike the central limit
theorem's GDP of subsampled DP-SGD). It is evaluated in log space: the reference implementation
(``pe.dp.gaussian``) computes ``e^epsilon`` directly and returns 0 once it overflows.

Example:
    >>> import math
    >>> n = 1_939_290                                   # Aug-PE's Yelp setting: sigma 15.34, T = 10
    >>> round(gdp_epsilon(gdp_mu(15.34, 10), 1 / (n * math.log(n))), 6)
    1.004455
    >>> round(calibrate_noise_multiplier(1.0, 1 / (n * math.log(n)), 10), 2)
    15.4
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr

__all__ = ["calibrate_noise_multiplier", "gdp_epsilon", "gdp_log_delta", "gdp_mu"]


def gdp_mu(noise_multiplier: float, releases: int) -> float:
    """``mu`` of ``releases`` Gaussian mechanisms of sensitivity 1 and noise ``noise_multiplier``."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (isinstance(releases, int) and releases >= 0):
        raise ValueError(f"releases must be an int >= 0, got {releases!r}")
    return math.sqrt(releases) / noise_multiplier


def gdp_log_delta(epsilon: float, mu: float) -> float:
    """``log delta(epsilon)`` of ``mu``-GDP (``-inf`` where delta underflows)."""
    if mu <= 0:
        return -math.inf
    a, b = -epsilon / mu + mu / 2, -epsilon / mu - mu / 2
    log_a, log_b = float(log_ndtr(a)), float(log_ndtr(b)) + epsilon
    gap = -math.expm1(log_b - log_a)  # delta = e^log_a (1 - e^(log_b - log_a)), log_b < log_a
    return log_a + math.log(gap) if gap > 0 else -math.inf


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ``epsilon >= 0`` at which ``mu``-GDP is ``(epsilon, delta)``-DP."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if mu <= 0:
        return 0.0
    target = math.log(delta)
    if gdp_log_delta(0.0, mu) <= target:
        return 0.0
    hi = 1.0
    while gdp_log_delta(hi, mu) > target:  # delta(epsilon) decreases in epsilon
        hi *= 2
        if hi > 1e6:
            return math.inf
    # The root is bracketed; brentq's tolerance is absolute and tiny, then one step up keeps the
    # answer on the safe side of the root (an epsilon whose delta is at most the target).
    eps = float(brentq(lambda e: gdp_log_delta(e, mu) - target, 0.0, hi, xtol=1e-13, rtol=1e-13))
    while gdp_log_delta(eps, mu) > target:
        eps = math.nextafter(eps, math.inf) + 1e-13
    return eps


def calibrate_noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier (to 1e-9 relative) whose ``releases`` Gaussian mechanisms
    are ``(epsilon, delta)``-DP."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(releases, int) and releases >= 1):
        raise ValueError(f"releases must be an int >= 1, got {releases!r}")
    # delta(epsilon; mu) increases with mu: bisect mu, keeping the lower end feasible.
    target = math.log(delta)
    lo, hi = 0.0, 1.0
    while gdp_log_delta(epsilon, hi) <= target:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gdp_log_delta(epsilon, mid) <= target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    if lo == 0.0:
        raise ValueError(f"no noise reaches epsilon {epsilon} at delta {delta}")
    return math.sqrt(releases) / lo
