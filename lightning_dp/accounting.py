"""What the mechanism did, and what it cost.

:class:`PrivacyHistory` is the ledger: run-length segments ``(noise_multiplier,
sample_rate, steps)`` of sampled-Gaussian steps, in the order they ran (the same layout as
Opacus accountants' ``history``). The strategy appends to it at every noisy step; the
``PrivacyBudget`` callback checkpoints it and turns it into epsilon with the functions here.

Accountant queries are costly (PRV: ~0.1-0.3 s, more with many segments), so results are
memoised and callers plan with :func:`max_steps` and :func:`calibrate_noise` once instead of
querying every step.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol, Sequence

from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

__all__ = [
    "AccountantName",
    "EpsilonTarget",
    "PrivacyHistory",
    "PrivacyTarget",
    "calibrate_noise",
    "compute_epsilon",
    "max_steps",
]

AccountantName = Literal["prv", "rdp", "gdp"]
ACCOUNTANTS: dict[str, type] = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}

Segment = tuple[float, float, int]

# Bounds the search for an allowed number of steps when the plan does not (PRV's grid grows
# with the step count: at 2**24 steps it asks for tens of GiB).
_STEP_SEARCH_CAP = 1 << 20


@dataclass
class PrivacyHistory:
    """Run-length ledger of sampled-Gaussian steps: ``[(noise_multiplier, sample_rate, steps)]``.

    Example:
        >>> h = PrivacyHistory()
        >>> h.record(1.0, 0.01); h.record(1.0, 0.01); h.record(2.0, 0.01)
        >>> h.segments
        [(1.0, 0.01, 2), (2.0, 0.01, 1)]
        >>> h.steps
        3
    """

    segments: list[Segment] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(s for _, _, s in self.segments)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append ``steps`` steps of the sampled Gaussian mechanism."""
        if steps <= 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.segments and self.segments[-1][:2] == (sigma, q):
            self.segments[-1] = (sigma, q, self.segments[-1][2] + steps)
        else:
            self.segments.append((sigma, q, steps))

    def extended(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyHistory:
        """A copy with ``steps`` more steps appended (for what-if queries)."""
        copy = PrivacyHistory(list(self.segments))
        copy.record(noise_multiplier, sample_rate, steps)
        return copy

    def is_prefix_of(self, other: PrivacyHistory) -> bool:
        """Whether ``other`` is this history followed by zero or more further steps."""
        if len(self.segments) > len(other.segments):
            return False
        for i, (mine, theirs) in enumerate(zip(self.segments, other.segments)):
            if mine[:2] != theirs[:2]:
                return False
            last = i == len(self.segments) - 1
            if mine[2] != theirs[2] and not (last and mine[2] < theirs[2]):
                return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segments = [(float(s), float(q), int(n)) for s, q, n in state["segments"]]


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@functools.lru_cache(maxsize=8192)
def _epsilon(segments: tuple[Segment, ...], delta: float, accountant: str) -> float:
    segments = tuple(s for s in segments if s[2] > 0)
    if not segments:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in segments):
        return math.inf
    if accountant == "gdp" and len(segments) > 1:
        # Opacus's GaussianAccountant reads only history[-1]: on a mixed history it would
        # silently report the last segment alone.
        raise ValueError(
            "The 'gdp' accountant cannot compose steps with different noise multipliers or sample "
            "rates (this run's history has several). Use accountant='prv' or 'rdp'."
        )
    with warnings.catch_warnings():
        # Opacus warns about RDP orders and numpy overflows on the far-off noise levels that
        # calibration probes (the bound stays valid), and that GDP is experimental (documented).
        warnings.simplefilter("ignore")
        if accountant == "prv" and _prv_points(segments, delta) > _MAX_PRV_POINTS:
            # Opacus's PRV accountant would allocate arrays of this many float64 points (tens of GiB
            # for little noise over many steps, where the OS kills the process rather than raise
            # MemoryError): report the RDP bound, valid and looser, instead.
            return float(rdp_to_epsilon(rdp_curve(segments), delta))
        acc = ACCOUNTANTS[accountant]()
        acc.history = [tuple(s) for s in segments]
        return float(acc.get_epsilon(delta=delta))


#: The largest discretisation the PRV accountant is asked for (each of its arrays: 8 bytes a point).
_MAX_PRV_POINTS = 1 << 25


def _prv_points(segments: tuple[Segment, ...], delta: float) -> float:
    """How many points Opacus's PRV accountant would discretise ``segments`` on (its
    ``_get_domain`` with the default errors): twice its safe domain size over its mesh."""
    eps_error, delta_error = 0.01, delta / 1000
    total = sum(n for _, _, n in segments)
    reach = float(rdp_to_epsilon(rdp_curve(segments), delta_error / 4))
    for sigma, q, _ in segments:
        reach = max(reach, float(rdp_to_epsilon(_one_step_rdp(sigma, q), delta_error / (8 * total))))
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * (max(reach, eps_error) + 3) / mesh


def compute_epsilon(history: PrivacyHistory | Iterable[Segment], delta: float, accountant: AccountantName = "prv") -> float:
    """Epsilon spent by ``history`` at ``delta`` according to ``accountant``.

    ``"prv"`` (default) and ``"rdp"`` are upper bounds; PRV is tight to about 0.01 in
    epsilon, RDP is looser. ``"gdp"`` is the central-limit approximation of Gaussian DP: an
    estimate, not a bound, accurate only for many steps at a small sample rate.

    Example:
        >>> round(compute_epsilon([(1.0, 256 / 60000, 2344)], delta=1e-5, accountant="rdp"), 3)
        1.352
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
    segments = history.segments if isinstance(history, PrivacyHistory) else list(history)
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in segments), float(delta), accountant)


class PrivacyTarget(Protocol):
    """What must hold of a history: ``value(history) <= limit`` (``value`` grows with more
    steps and with less noise). :class:`EpsilonTarget` here; the attack-risk targets in
    :mod:`lightning_dp.risk`."""

    @property
    def name(self) -> str: ...

    @property
    def limit(self) -> float: ...

    def value(self, history: PrivacyHistory) -> float: ...


@dataclass(frozen=True)
class EpsilonTarget:
    """Keep epsilon at ``delta`` (per ``accountant``) at most ``epsilon``.

    Example:
        >>> target = EpsilonTarget(2.0, 1e-5, "rdp")
        >>> round(target.value(PrivacyHistory([(1.0, 0.01, 1000)])), 3), target.limit
        (2.101, 2.0)
    """

    epsilon: float
    delta: float
    accountant: AccountantName = "prv"

    @property
    def name(self) -> str:
        return "epsilon"

    @property
    def limit(self) -> float:
        return self.epsilon

    def value(self, history: PrivacyHistory) -> float:
        return compute_epsilon(history, self.delta, self.accountant)


def _targets(
    epsilon: Optional[float], delta: Optional[float], accountant: AccountantName, targets: Sequence[PrivacyTarget]
) -> list[PrivacyTarget]:
    out: list[PrivacyTarget] = []
    if epsilon is not None:
        if delta is None:
            raise ValueError("an epsilon target needs its delta")
        out.append(EpsilonTarget(epsilon, delta, accountant))
    out.extend(targets)
    if not out:
        raise ValueError("nothing to hold: give epsilon (with delta) or targets")
    return out


def max_steps(
    history: PrivacyHistory,
    noise_multiplier: float,
    sample_rate: float,
    epsilon: Optional[float] = None,
    delta: Optional[float] = None,
    accountant: AccountantName = "prv",
    limit: Optional[int] = None,
    *,
    targets: Sequence[PrivacyTarget] = (),
) -> int:
    """The largest number of further steps at ``(noise_multiplier, sample_rate)`` after
    ``history`` whose total epsilon stays at most ``epsilon`` and every one of ``targets``
    holds (capped at ``limit``).

    Example:
        >>> max_steps(PrivacyHistory(), 1.0, 0.01, epsilon=2.0, delta=1e-5, accountant="rdp", limit=10_000)
        881
    """
    musts = _targets(epsilon, delta, accountant, targets)

    def fits(n: int) -> bool:
        extended = history.extended(noise_multiplier, sample_rate, n)
        try:
            return all(t.value(extended) <= t.limit for t in musts)
        except (MemoryError, OverflowError, FloatingPointError):
            return False  # an accountant that cannot answer allows nothing: the safe side

    if noise_multiplier == 0 or not fits(0):
        return 0
    if limit is not None and fits(limit):
        return limit
    cap = _STEP_SEARCH_CAP if limit is None else min(limit, _STEP_SEARCH_CAP)
    lo, hi = 0, 1
    while hi < cap and fits(hi):  # exponential search so small budgets stay cheap
        lo, hi = hi, min(2 * hi, cap)
    if fits(hi):
        return hi  # the cap itself fits
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def calibrate_noise(
    history: PrivacyHistory,
    sample_rate: float,
    steps: int,
    epsilon: Optional[float] = None,
    delta: Optional[float] = None,
    accountant: AccountantName = "prv",
    rel_tol: float = 0.01,
    *,
    targets: Sequence[PrivacyTarget] = (),
) -> float:
    """The smallest noise multiplier (to ``rel_tol`` of the binding target) such that
    ``history`` followed by ``steps`` steps at ``sample_rate`` spends at most ``epsilon``
    and meets every one of ``targets``.

    Raises:
        ValueError: if the history alone already spends the budget.

    Example:
        >>> sigma = calibrate_noise(PrivacyHistory(), 0.01, 1000, epsilon=2.0, delta=1e-5, accountant="rdp")
        >>> 0.98 * 2.0 <= compute_epsilon([(sigma, 0.01, 1000)], 1e-5, "rdp") <= 2.0
        True
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive to calibrate the noise, got {steps}")
    musts = _targets(epsilon, delta, accountant, targets)

    def values_at(sigma: float) -> list[float]:
        extended = history.extended(sigma, sample_rate, steps)
        return [t.value(extended) for t in musts]

    def fits(sigma: float) -> bool:
        return all(v <= t.limit for v, t in zip(_safe(values_at, sigma, len(musts)), musts))

    for target in musts:
        spent = target.value(history)
        if not spent < target.limit:  # NaN too
            raise ValueError(
                f"The recorded history already spends {target.name}={spent:.4g} of the target {target.limit:.4g}; "
                "no noise level allows further steps."
            )

    def load(sigma: float) -> float:
        """How much of the binding target ``sigma`` uses: > 1 overspends (NaN counts as inf)."""
        ratios = [v / t.limit for v, t in zip(_safe(values_at, sigma, len(musts)), musts)]
        worst = max(ratios)
        return worst if worst == worst else math.inf

    # Bracket the answer: lo overspends (or is 0), hi fits. The targets' values are nearly
    # straight lines in log-log against sigma, so secant steps there (Illinois' variant, which
    # cannot stall) land within rel_tol in a few queries where bisection needs ten (each PRV
    # query costs 0.1-0.8 s).
    hi, load_hi = 1.0, load(1.0)
    lo, load_lo = 0.0, math.inf
    while load_hi > 1.0:
        lo, load_lo = hi, load_hi
        hi *= 4 if load_hi > 4 else 2
        if hi > 1e6:
            raise ValueError("No noise multiplier below 1e6 meets the target; the budget is too small.")
        load_hi = load(hi)
    if lo == 0.0:
        while hi > 1e-3:  # step down until something overspends
            lower = hi / 2
            load_lower = load(lower)
            if load_lower > 1.0:
                lo, load_lo = lower, load_lower
                break
            hi, load_hi = lower, load_lower
    aim = math.log1p(-rel_tol / 2)  # inside the tolerance, on the fitting side
    side = 0
    for _ in range(60):
        if load_hi >= 1.0 - rel_tol or hi - lo <= 1e-6 * hi:
            break
        if lo > 0.0 and math.isfinite(load_lo) and load_lo > 0 and load_hi > 0:
            x_lo, x_hi = math.log(lo), math.log(hi)
            y_lo, y_hi = math.log(load_lo) - aim, math.log(load_hi) - aim
            if side == 1:
                y_lo /= 2  # Illinois: the end that keeps being kept is halved
            elif side == -1:
                y_hi /= 2
            x = x_hi - y_hi * (x_hi - x_lo) / (y_hi - y_lo) if y_hi != y_lo else (x_lo + x_hi) / 2
            mid = min(max(math.exp(x), lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
        else:
            mid = (lo + hi) / 2
        load_mid = load(mid)
        if load_mid <= 1.0:
            hi, load_hi = mid, load_mid
            side = 1 if side >= 0 else 0
        else:
            lo, load_lo = mid, load_mid
            side = -1 if side <= 0 else 0
    return hi


def _safe(values_at: Any, sigma: float, count: int) -> list[float]:
    """The targets' values at ``sigma``, treating numerical failure at tiny noise as an
    infinite cost."""
    if sigma <= 0:
        return [math.inf] * count
    try:
        return values_at(sigma)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
        return [math.inf] * count


# ---------------------------------------------------------------------- Renyi DP curves
#: The orders Opacus's RDP accountant uses.
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


def rdp_curve(history: PrivacyHistory | Iterable[Segment], orders: Sequence[float] = RDP_ORDERS) -> Any:
    """The Renyi DP of ``history`` at each of ``orders`` (a numpy array): composition adds the
    segments' curves (Mironov 2017).

    Example:
        >>> curve = rdp_curve([(1.0, 0.01, 100)], orders=(2.0, 8.0))
        >>> [round(float(v), 5) for v in curve]
        [0.01718, 0.08936]
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    segments = history.segments if isinstance(history, PrivacyHistory) else list(history)
    total = np.zeros(len(orders))
    for sigma, q, n in segments:
        if n <= 0:
            continue
        if sigma == 0:
            return np.full(len(orders), math.inf)
        if tuple(orders) == RDP_ORDERS:
            total = total + n * _one_step_rdp(float(sigma), float(q))
        else:
            total = total + compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=list(orders))
    return total


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(sigma: float, q: float) -> Any:
    """One sampled-Gaussian step's RDP at :data:`RDP_ORDERS` (composition multiplies it)."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)), dtype=np.float64)
    curve.setflags(write=False)
    return curve


def rdp_to_epsilon(curve: Any, delta: float, orders: Sequence[float] = RDP_ORDERS) -> Any:
    """Epsilon at ``delta`` from Renyi DP curves (the last axis of ``curve`` runs over
    ``orders``), with the conversion of Balle et al. 2020 (Theorem 21) that Opacus uses;
    vectorised over the leading axes.

    Example:
        >>> round(float(rdp_to_epsilon(rdp_curve([(1.0, 256 / 60000, 2344)]), 1e-5)), 3)
        1.352
    """
    import numpy as np

    _check_delta(delta)
    alphas = np.asarray(orders, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = curve - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return np.maximum(eps.min(axis=-1), 0.0)
