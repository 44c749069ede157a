"""What a history of mechanisms cost: the accountants, and planning a run with them.

:func:`compute_epsilon` turns a :class:`~lightning_dp.core.history.PrivacyHistory` into epsilon
with the accountant named (``"prv"``, ``"rdp"``, ``"gdp"``: Opacus's), :func:`rdp_curve` into
its Renyi-DP curve. :func:`max_steps` and :func:`calibrate_noise` plan a DP-SGD run against
targets (epsilon, and the attack-risk targets of :mod:`lightning_dp.core.risk`).

Accountant queries are costly (PRV: 0.1-0.8 s, more with many segments), so results are
memoised and callers plan once instead of querying every step.

Why one module of about 420 lines: composition, calibration and planning search the same
memoised accountant queries; split, each would need the cache and the RDP fallbacks.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol, Sequence, Union

from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import Domain

from lightning_dp.core.events import Event, GaussianRelease, NonPrivate, NoOp, RenyiCharge, SampledGaussian
from lightning_dp.core.history import Entry, PrivacyHistory, Segment

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "EpsilonTarget",
    "PrivacyHistory",
    "PrivacyTarget",
    "RDP_ORDERS",
    "calibrate_noise",
    "compute_epsilon",
    "max_steps",
    "rdp_curve",
    "rdp_to_epsilon",
    "supports",
]

AccountantName = Literal["prv", "rdp", "gdp"]


class _PRVAccountant(PRVAccountant):
    """Opacus's PRV accountant, its discretisation domain computed from our memoised RDP curves.

    Opacus's ``compute_safe_domain_size`` builds fresh RDP accountants on every query and
    evaluates the sampled Gaussian's RDP at its 150 orders (99 fractional, a series each): about
    0.3 s per segment per query, most of a calibration's time (a PrivacyBudget's plan took ~9 s).
    :func:`_safe_domain_size` is the same formula at the same orders (tests/test_accounting.py
    compares the two), each ``(sigma, q)`` curve computed once."""

    def _get_domain(self, prvs: Any, num_self_compositions: Any, eps_error: float, delta_error: float) -> Domain:
        segments = tuple((p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions))
        size = _safe_domain_size(segments, eps_error, delta_error)
        return Domain.create_aligned(-size, size, _prv_mesh(segments, eps_error, delta_error))


ACCOUNTANTS: dict[str, type] = {"prv": _PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}

#: A history, or DP-SGD segments ``(noise_multiplier, sample_rate, steps)``.
HistoryLike = Union[PrivacyHistory, Iterable[Segment]]

# Bounds the search for an allowed number of steps when the plan does not (PRV's grid grows
# with the step count: at 2**24 steps it asks for tens of GiB).
_STEP_SEARCH_CAP = 1 << 20


def supports(accountant: str, event: Event) -> bool:
    """Whether ``accountant`` can compose ``event``: Opacus's accountants compose (sampled)
    Gaussian mechanisms; a :class:`RenyiCharge` is composed by the ``"rdp"`` accountant only.

    Example:
        >>> supports("prv", RenyiCharge((3.0,), (0.01,))), supports("rdp", RenyiCharge((3.0,), (0.01,)))
        (False, True)
    """
    if accountant not in ACCOUNTANTS:
        return False
    return not isinstance(event, RenyiCharge) or accountant == "rdp"


def as_history(history: HistoryLike) -> PrivacyHistory:
    return history if isinstance(history, PrivacyHistory) else PrivacyHistory(list(history))


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@functools.lru_cache(maxsize=8192)
def _epsilon(entries: tuple[Entry, ...], delta: float, accountant: str) -> float:
    entries = tuple(e for e in entries if e.count > 0 and not isinstance(e.event, NoOp))
    if not entries:
        return 0.0
    if any(isinstance(e.event, NonPrivate) for e in entries):
        return math.inf
    unsupported = sorted({type(e.event).__name__ for e in entries if not supports(accountant, e.event)})
    if unsupported:
        raise ValueError(
            f"The {accountant!r} accountant cannot compose {', '.join(unsupported)} events (a mechanism known only by "
            "its Renyi-DP curve): use accountant='rdp' for this history."
        )
    if any(isinstance(e.event, RenyiCharge) for e in entries):
        return float(rdp_to_epsilon(rdp_curve(PrivacyHistory(entries)), delta))
    if accountant in ("prv", "gdp") and all(isinstance(e.event, GaussianRelease) for e in entries):
        # Gaussian mechanisms without sampling compose exactly to mu-GDP (Private Evolution's
        # histograms): the exact figure, not the PRV accountant's numerical upper bound.
        from lightning_dp.core.gaussian_dp import gdp_epsilon

        mu = math.sqrt(sum(e.count / float(getattr(e.event, "noise_multiplier")) ** 2 for e in entries))  # noqa: B009
        return gdp_epsilon(mu, delta)
    # Opacus's accountants compose Poisson-sampled Gaussians; a Gaussian release is one at rate 1.
    segments = tuple(
        (float(getattr(e.event, "noise_multiplier")), float(getattr(e.event, "sample_rate", 1.0)), e.count)  # noqa: B009
        for e in entries
    )
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
    return 2 * _safe_domain_size(segments, eps_error, delta_error) / _prv_mesh(segments, eps_error, delta_error)


@functools.lru_cache(maxsize=1024)
def _safe_domain_size(segments: tuple[Segment, ...], eps_error: float, delta_error: float) -> float:
    """Opacus's ``compute_safe_domain_size`` (Gopi et al. 2021, remark 5.6, as their code has it):
    how far the privacy loss reaches, from the RDP bounds of the whole history and of one step.
    Memoised: a PRV query asks for it twice (the size check, then the accountant's domain)."""
    total = sum(n for _, _, n in segments)
    reach = float(rdp_to_epsilon(rdp_curve(segments), delta_error / 4))
    for sigma, q, _ in segments:
        reach = max(reach, float(rdp_to_epsilon(_one_step_rdp(sigma, q), delta_error / (8 * total))))
    return max(reach, eps_error) + 3


def _prv_mesh(segments: Sequence[Segment], eps_error: float, delta_error: float) -> float:
    total = sum(n for _, _, n in segments)
    return eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)


def compute_epsilon(history: HistoryLike, delta: float, accountant: AccountantName = "prv") -> float:
    """Epsilon spent by ``history`` at ``delta`` according to ``accountant``.

    ``"prv"`` (default) and ``"rdp"`` are upper bounds; PRV is tight to about 0.01 in
    epsilon, RDP is looser. ``"gdp"`` is the central-limit approximation of Gaussian DP: an
    estimate, not a bound, accurate only for many steps at a small sample rate. A history with
    Renyi-DP charges (:class:`~lightning_dp.core.events.RenyiCharge`) needs ``"rdp"``.

    Example:
        >>> round(compute_epsilon([(1.0, 256 / 60000, 2344)], delta=1e-5, accountant="rdp"), 3)
        1.352
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
    return _epsilon(tuple(as_history(history).entries), float(delta), accountant)


class PrivacyTarget(Protocol):
    """What must hold of a history: ``value(history) <= limit`` (``value`` grows with more
    steps and with less noise). :class:`EpsilonTarget` here; the attack-risk targets in
    :mod:`lightning_dp.core.risk`."""

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


def rdp_curve(history: HistoryLike, orders: Sequence[float] = RDP_ORDERS) -> Any:
    """The Renyi DP of ``history`` at each of ``orders`` (a numpy array): composition adds the
    events' curves (Mironov 2017). A sampled Gaussian's is Opacus's (Mironov, Talwar and Zhang
    2019), a Gaussian release's ``alpha / (2 sigma^2)``, a Renyi charge's its own (infinite at
    orders it does not give).

    Example:
        >>> curve = rdp_curve([(1.0, 0.01, 100)], orders=(2.0, 8.0))
        >>> [round(float(v), 5) for v in curve]
        [0.01718, 0.08936]
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    alphas = np.asarray(orders, dtype=np.float64)
    total = np.zeros(len(alphas))
    for entry in as_history(history).entries:
        event, n = entry.event, entry.count
        if isinstance(event, NoOp):
            continue
        if isinstance(event, NonPrivate):
            return np.full(len(alphas), math.inf)
        if isinstance(event, SampledGaussian):
            sigma, q = event.noise_multiplier, event.sample_rate
            if tuple(orders) == RDP_ORDERS:
                total = total + n * _one_step_rdp(sigma, q)
            else:
                total = total + compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=list(orders))
        elif isinstance(event, GaussianRelease):
            total = total + n * alphas / (2 * event.noise_multiplier**2)
        else:
            total = total + n * np.asarray([event.epsilon_at(float(a)) for a in alphas])
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
