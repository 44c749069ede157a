"""The one-run audit's bound (Steinke, Nasr & Jagielski, NeurIPS 2023): the lower bound on a
run's epsilon that its canary guesses prove. The callback that draws the canaries and guesses is
:class:`~lightning_dp.PrivacyAudit` (``lightning_dp.lightning.audit``).

``m`` canaries are each included in training independently with probability 1/2; after
training the auditor guesses "in" or "out" for ``r`` of them and gets ``v`` right. Under
(epsilon, delta)-DP, ``v`` cannot be much larger than ``Bin(r, e^eps / (1 + e^eps))`` allows;
:func:`epsilon_lower_bound` returns the largest epsilon that the observed ``v`` rules out at
confidence ``1 - p``. It never claims more than the data show: it is a lower bound on the
epsilon the training run actually has, to compare with the epsilon the accountant claims.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["audit_p_value", "epsilon_lower_bound"]

def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, under (epsilon, delta)-DP, of ``v`` or more correct guesses out of
    ``r`` (Steinke et al. 2023, Theorem 5.2):

    ``P[Bin(r, q) >= v] + 2 m delta max_{1<=i<=v} (1/i) P[v - i <= Bin(r, q) < v]``,
    with ``q = 1 / (1 + e^-epsilon)``.
    """
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Bin >= v]
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    slack = float(np.max((binom.cdf(v - 1, r, q) - binom.cdf(v - i - 1, r, q)) / i))
    return tail + 2 * m * delta * slack


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon for which ``v`` correct guesses out of ``r`` (with ``m`` canaries)
    would still be implausible at level ``p``: ``sup{eps : p(eps, delta) < p}``, by bisection.
    ``0.0`` when no positive epsilon is ruled out.

    Example:
        >>> round(epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0), 4)
        3.493
        >>> round(epsilon_lower_bound(m=1000, r=1000, v=600, delta=1e-5), 4)
        0.2972
    """
    if not (isinstance(m, int) and isinstance(r, int) and isinstance(v, int)) or not 0 <= v <= r <= m or r == 0:
        raise ValueError(f"need integers with 0 <= v <= r <= m and r > 0, got m={m}, r={r}, v={v}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if audit_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < p:  # p(eps) grows with eps
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf  # nothing short of infinite epsilon explains v (e.g. delta = 0, v = r large)
    for _ in range(60):
        mid = (lo + hi) / 2
        if audit_p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo
