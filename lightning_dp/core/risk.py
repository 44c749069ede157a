"""Privacy risk in attack terms: what the whole privacy profile of a run bounds.

One (epsilon, delta) point says little to an attacker's success; the run's *privacy
profile* ``delta(eps)`` for every ``eps >= 0`` (both neighbouring directions: adding and
removing a record) says everything a hypothesis test can achieve. By f-DP (Dong, Roth & Su
2019, Prop. 2.12) the run is f-DP with

    f(alpha) = sup_eps max(0, 1 - delta(eps) - e^eps alpha, e^-eps (1 - delta(eps) - alpha)),

so a membership-inference attacker with false-positive rate ``alpha`` has true-positive
rate at most ``1 - f(alpha)``, its advantage ``TPR - FPR`` is at most ``delta(0)`` (the
total variation), and an attacker reconstructing a record that a baseline guesses with
probability ``kappa`` succeeds with probability at most ``1 - f(kappa)`` (Hayes et al. 2023;
Kaissis et al. 2023).

The profile comes from Google's ``dp_accounting`` privacy loss distribution (PLD) with its
pessimistic connect-the-dots discretisation, so every ``delta(eps)`` is an upper bound; any
set of ``eps`` gives a valid ``f``, and this module evaluates ``delta`` at every point of the
PLD's loss grid, where the envelope of the discrete PLD is attained. Every figure here is
therefore an upper bound on the attack's success (never an estimate), tight to the grid
(``1e-4`` in the privacy loss; coarser only when a near-non-private history would need more
than a million grid points, which loosens the bound but keeps it valid).

``riskcal`` (PyPI) implements the same conversions with a "direct" method that pairs the
REMOVE and ADD PLDs; on Poisson-subsampled compositions its result moves with the grid
(q=256/60000, sigma=1.1, 14063 steps: TPR at FPR 0.1% is 0.00603, 0.00593, 0.00554, 0.00402
at grids 4e-4, 2e-4, 1e-4, 5e-5) and falls below the converged bound 0.00605 that two
independent accountants agree on, so it is not used.

(About 400 lines: the profile, its risk read-outs and the risk targets share the grid logic.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from lightning_dp.core.accounting import HistoryLike, as_history
from lightning_dp.core.events import GaussianRelease, NonPrivate, NoOp, SampledGaussian
from lightning_dp.core.history import Segment

__all__ = [
    "AdvantageTarget",
    "PrivacyProfile",
    "PrivacyRisk",
    "TprTarget",
    "epsilon_delta_risk",
    "privacy_profile",
    "privacy_risk",
    "risk_targets",
    "tpr_bound",
]

#: The PLD grid in privacy loss (dp_accounting's default): sub-1e-3 accuracy on every figure.
_FINEST_GRID = 1e-4
#: Grid points allowed for one step's PLD and for the composed one; beyond, the grid coarsens
#: (by powers of two, so that equal histories share cached profiles).
_MAX_STEP_POINTS = 200_000
_MAX_POINTS = 1_000_000
#: Lines evaluated per block when many false-positive rates are asked at once (memory bound).
_BLOCK = 16


@dataclass(frozen=True)
class PrivacyRisk:
    """Upper bounds on what an attacker can achieve against any one record.

    Attributes:
        advantage: bound on a membership-inference attacker's ``max TPR - FPR``
            (= ``delta(eps=0)``, the total variation between neighbouring runs).
        tpr_at_fpr: false-positive rate -> bound on the attacker's true-positive rate.
        reconstruction: bound on the probability of reconstructing a record that a
            baseline guesses with probability ``kappa``; ``None`` without ``kappa``.
        kappa: the reconstruction baseline, or ``None``.
    """

    advantage: float
    tpr_at_fpr: dict[float, float]
    reconstruction: Optional[float] = None
    kappa: Optional[float] = None


class PrivacyProfile:
    """The privacy profile ``delta(eps)`` of a history, both neighbouring directions, on the
    PLD's loss grid ``eps = 0, h, 2h, ...``; answers every risk question from it.

    Build it with :func:`privacy_profile` (memoised per history).

    Example:
        >>> profile = privacy_profile([(5.0, 1.0, 1)])  # one Gaussian step, sigma = 5
        >>> round(profile.advantage, 4)  # 2 Phi(1 / (2 sigma)) - 1
        0.0797
    """

    def __init__(self, epsilons: np.ndarray, deltas: np.ndarray, discretization: float) -> None:
        self.epsilons = epsilons
        self.deltas = deltas
        self.discretization = discretization

    @property
    def advantage(self) -> float:
        """Bound on ``max TPR - FPR`` of any membership-inference attack: ``delta(0)``."""
        return float(self.deltas[0])

    def epsilon(self, delta: float) -> float:
        """Smallest grid epsilon whose delta is at most ``delta`` (an upper bound on the
        exact epsilon, within one grid step); ``inf`` when none is."""
        _check_open_unit(delta, "delta")
        ok = np.nonzero(self.deltas <= delta)[0]
        return float(self.epsilons[ok[0]]) if ok.size else math.inf

    def tpr_bound(self, fpr: Union[float, Sequence[float], np.ndarray]) -> np.ndarray:
        """``1 - f(fpr)``: the most any membership-inference attack's TPR can be at ``fpr``."""
        alpha = np.asarray(fpr, dtype=np.float64)
        if np.any(~np.isfinite(alpha)) or np.any((alpha < 0) | (alpha > 1)):
            raise ValueError(f"false-positive rates must be in [0, 1], got {fpr!r}")
        flat = alpha.reshape(-1)
        out = np.empty_like(flat)
        shrink = np.exp(-self.epsilons)
        with np.errstate(over="ignore"):
            growth = np.exp(self.epsilons)  # inf on wide loss ranges: those lines bound nothing
        for start in range(0, flat.size, _BLOCK):
            a = flat[start : start + _BLOCK, None]
            # TPR <= delta + e^eps FPR (the attack's own direction) and, from the complement
            # of its rejection region, TPR <= 1 - e^-eps (1 - delta - FPR).
            with np.errstate(invalid="ignore"):
                slope = np.where(a > 0, growth * a, 0.0)  # inf * 0 at FPR = 0 is 0
            direct = np.min(self.deltas + slope, axis=1)
            complement = np.min(1.0 - shrink * (1.0 - self.deltas - a), axis=1)
            out[start : start + _BLOCK] = np.minimum(direct, complement)
        # Floating error must not make the bound claim less than chance or more than 1.
        return np.clip(out, flat, 1.0).reshape(alpha.shape)

    def risk(self, fprs: Sequence[float] = (0.001, 0.01), kappa: Optional[float] = None) -> PrivacyRisk:
        """The :class:`PrivacyRisk` at ``fprs`` (and reconstruction at baseline ``kappa``)."""
        fprs = _check_fprs(fprs)
        if kappa is not None:
            _check_open_unit(kappa, "kappa")
        points = list(fprs) + ([kappa] if kappa is not None else [])
        tprs = self.tpr_bound(np.asarray(points, dtype=np.float64)) if points else np.empty(0)
        return PrivacyRisk(
            advantage=self.advantage,
            tpr_at_fpr={fpr: float(t) for fpr, t in zip(fprs, tprs)},
            reconstruction=float(tprs[-1]) if kappa is not None else None,
            kappa=None if kappa is None else float(kappa),
        )


def privacy_profile(history: HistoryLike, finest_grid: float = _FINEST_GRID) -> PrivacyProfile:
    """The privacy profile of ``history`` (segments ``(noise_multiplier, sample_rate, steps)``
    of Poisson-sampled Gaussian steps), from ``dp_accounting``'s PLD; memoised.

    ``finest_grid`` is the PLD's loss discretisation (default 1e-4): a coarser one (1e-3, as
    the logged figures of a plan use) is several times faster and still an upper bound, a
    little looser.

    Example:
        >>> profile = privacy_profile([(1.1, 256 / 60000, 14063)])
        >>> round(profile.advantage, 4), round(profile.epsilon(1e-5), 2)
        (0.2245, 2.38)
    """
    return _profile(_segments(history), float(finest_grid))


def privacy_risk(
    history: HistoryLike,
    fprs: Sequence[float] = (0.001, 0.01),
    kappa: Optional[float] = None,
) -> PrivacyRisk:
    """Bounds on membership inference (advantage, TPR at each of ``fprs``) and, given a
    baseline success probability ``kappa``, on reconstruction, for the steps in ``history``.

    Example:
        >>> risk = privacy_risk([(1.1, 256 / 60000, 14063)], kappa=0.01)
        >>> round(risk.advantage, 4), round(risk.tpr_at_fpr[0.01], 4), round(risk.reconstruction, 4)
        (0.2245, 0.0402, 0.0402)
    """
    return privacy_profile(history).risk(fprs, kappa)


def tpr_bound(history: HistoryLike, fpr: Union[Sequence[float], np.ndarray]) -> np.ndarray:
    """The ROC upper bound ``1 - f(fpr)`` of ``history``: no membership-inference attack's
    ROC curve passes above it (for plots).

    Example:
        >>> tpr_bound([], [0.0, 0.5, 1.0]).tolist()  # no step taken: chance
        [0.0, 0.5, 1.0]
    """
    return privacy_profile(history).tpr_bound(fpr)


def epsilon_delta_risk(
    epsilon: float, delta: float, fprs: Sequence[float] = (0.001, 0.01), kappa: Optional[float] = None
) -> PrivacyRisk:
    """What a single ``(epsilon, delta)`` guarantee alone bounds (f = f_{eps,delta}): much
    looser than the profile's bounds; for comparison.

    Example:
        >>> risk = epsilon_delta_risk(2.3818, 1e-5)
        >>> round(risk.advantage, 4), round(risk.tpr_at_fpr[0.001], 4), round(risk.tpr_at_fpr[0.01], 4)
        (0.8309, 0.0108, 0.1083)
    """
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    _check_open_unit(delta, "delta")
    if math.isinf(epsilon):
        profile = PrivacyProfile(np.zeros(1), np.ones(1), 0.0)
    else:
        # delta(eps') = delta for eps' >= eps is all the guarantee says; the line at eps' = eps
        # dominates the larger ones, and (e^eps - 1 + 2 delta) / (e^eps + 1) is its advantage.
        advantage = (math.expm1(epsilon) + 2 * delta) / (math.exp(epsilon) + 1)
        profile = PrivacyProfile(np.array([0.0, float(epsilon)]), np.array([min(advantage, 1.0), delta]), 0.0)
    return profile.risk(fprs, kappa)


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True)
class AdvantageTarget:
    """Keep the membership-inference advantage bound at most ``limit`` (for
    :func:`~lightning_dp.core.accounting.max_steps` / :func:`~lightning_dp.core.accounting.calibrate_noise`).

    Example:
        >>> AdvantageTarget(0.1).value([(5.0, 1.0, 1)]) <= 0.1
        True
    """

    limit: float

    def __post_init__(self) -> None:
        if not (isinstance(self.limit, (int, float)) and 0 < self.limit < 1):
            raise ValueError(f"max_advantage must be a number in (0, 1), got {self.limit!r}")

    @property
    def name(self) -> str:
        return "advantage"

    def value(self, history: HistoryLike) -> float:
        return privacy_profile(history).advantage


@dataclass(frozen=True)
class TprTarget:
    """Keep the bound on a membership-inference attacker's TPR at false-positive rate
    ``fpr`` at most ``limit``.

    Example:
        >>> round(TprTarget(0.01, 0.05).value([]), 6)  # nothing released: chance
        0.01
    """

    fpr: float
    limit: float

    def __post_init__(self) -> None:
        _check_open_unit(self.fpr, "max_tpr_at_fpr: the false-positive rate")
        if not (isinstance(self.limit, (int, float)) and self.fpr < self.limit < 1):
            raise ValueError(
                f"max_tpr_at_fpr={{{self.fpr:g}: {self.limit!r}}}: the TPR target must be a number above its "
                f"false-positive rate {self.fpr:g} (chance: an attack that guesses already reaches TPR = FPR) "
                "and below 1."
            )

    @property
    def name(self) -> str:
        return f"tpr_at_fpr_{self.fpr:g}"

    def value(self, history: HistoryLike) -> float:
        return float(privacy_profile(history).tpr_bound(self.fpr))


def risk_targets(
    max_advantage: Optional[float] = None, max_tpr_at_fpr: Optional[Mapping[float, float]] = None
) -> list[Union[AdvantageTarget, TprTarget]]:
    """Validated targets for ``max_advantage`` and ``max_tpr_at_fpr`` (``{fpr: max_tpr}``).

    Example:
        >>> risk_targets(0.1, {0.01: 0.05})
        [AdvantageTarget(limit=0.1), TprTarget(fpr=0.01, limit=0.05)]
    """
    targets: list[Union[AdvantageTarget, TprTarget]] = []
    if max_advantage is not None:
        targets.append(AdvantageTarget(max_advantage))
    if max_tpr_at_fpr is not None:
        if not isinstance(max_tpr_at_fpr, Mapping) or not max_tpr_at_fpr:
            raise ValueError(
                f"max_tpr_at_fpr must be a non-empty dict {{false-positive rate: max TPR}}, e.g. {{0.01: 0.05}}, "
                f"got {max_tpr_at_fpr!r}"
            )
        for fpr, tpr in sorted(max_tpr_at_fpr.items()):
            targets.append(TprTarget(fpr, tpr))
    return targets


# ---------------------------------------------------------------------- numerics


def _check_open_unit(value: object, what: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"{what} must be a number in (0, 1), got {value!r}")


def _check_fprs(fprs: Sequence[float]) -> tuple[float, ...]:
    if isinstance(fprs, (int, float)) or not isinstance(fprs, Iterable):
        raise ValueError(f"fprs must be a sequence of false-positive rates, e.g. (0.001, 0.01), got {fprs!r}")
    out = tuple(fprs)
    for fpr in out:
        _check_open_unit(fpr, "each false-positive rate in fprs")
    return tuple(float(f) for f in out)


def _segments(history: HistoryLike) -> tuple[Segment, ...]:
    """The (sampled) Gaussian segments the PLD composes: a Gaussian release is one at rate 1,
    no noise is sigma 0, a step that released nothing is left out."""
    out = []
    for entry in as_history(history).entries:
        event, n = entry.event, entry.count
        if isinstance(event, NoOp) or n == 0:
            continue
        if isinstance(event, NonPrivate):
            out.append((0.0, event.sample_rate, n))
        elif isinstance(event, SampledGaussian):
            out.append((event.noise_multiplier, event.sample_rate, n))
        elif isinstance(event, GaussianRelease):
            out.append((event.noise_multiplier, 1.0, n))
        else:
            raise ValueError(
                f"A privacy profile (the attack-risk bounds) needs the mechanism's privacy loss distribution; a "
                f"{type(event).__name__} gives only a Renyi-DP curve."
            )
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _profile(segments: tuple[Segment, ...], finest: float = _FINEST_GRID) -> PrivacyProfile:
    if not segments:
        return PrivacyProfile(np.zeros(1), np.zeros(1), finest)
    if any(sigma == 0 for sigma, _, _ in segments):
        return PrivacyProfile(np.zeros(1), np.ones(1), finest)  # a noiseless release
    grid = _grid(segments, finest)
    pld: Any = None
    for sigma, q, n in segments:
        part = _one_step(sigma, q, grid)
        part = part.self_compose(n) if n > 1 else part
        pld = part if pld is None else pld.compose(part)
    pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]  # noqa: SLF001
    arrays = [_dense(pmf) for pmf in pmfs]
    top = max(losses[-1] if losses.size else 0.0 for losses, _, _ in arrays)
    epsilons = np.arange(int(math.floor(max(top, 0.0) / grid)) + 2) * grid
    deltas = np.max([_hockey_stick(*arr, epsilons) for arr in arrays], axis=0)
    return PrivacyProfile(epsilons, np.clip(deltas, 0.0, 1.0), grid)


@functools.lru_cache(maxsize=16)
def _one_step(sigma: float, q: float, grid: float):  # -> dp_accounting PrivacyLossDistribution
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=grid,
        pessimistic_estimate=True, use_connect_dots=True,
    )


def _grid(segments: tuple[Segment, ...], finest: float = _FINEST_GRID) -> float:
    """The finest grid whose PLDs stay within the point budgets (a power-of-two multiple of
    1e-4). A coarser grid keeps the bound valid (pessimistic) and loosens it only where the
    loss range is large, i.e. where the risk is near 1 anyway."""
    step_span, variance = 0.0, 0.0
    for sigma, q, n in segments:
        # dp_accounting keeps the noise within about 10 sigma of its mean (mass e^-50 dropped).
        reach = min((1 + 20 * sigma) / (2 * sigma**2), 700.0)
        top = math.log1p(-q + q * math.exp(reach)) if q < 1 else reach
        bottom = math.log1p(-q) if q < 1 else -reach
        step_span = max(step_span, top - bottom)
        # Variance of one step's privacy loss: 1/sigma^2 at q = 1, about q^2 (e^{1/sigma^2} - 1) below.
        variance += n * min(q**2 * math.expm1(min(1 / sigma**2, 700.0)), 1 / sigma**2)
    composed_span = step_span + 20 * math.sqrt(variance)
    need = max(step_span / _MAX_STEP_POINTS, composed_span / _MAX_POINTS, finest)
    return finest * 2 ** math.ceil(math.log2(need / finest) - 1e-9)


def _dense(pmf) -> tuple[np.ndarray, np.ndarray, float]:
    """(losses ascending, probabilities, infinity mass) of a dp_accounting PLD pmf."""
    dense = pmf.to_dense_pmf()
    # dp_accounting's own delta loop is pure Python (seconds on 10^5 points); its dense pmf's
    # arrays let numpy do it in milliseconds. tests/test_risk.py checks both agree.
    probs = np.clip(np.asarray(dense._probs, dtype=np.float64), 0.0, None)  # noqa: SLF001
    losses = (dense._lower_loss + np.arange(probs.size)) * dense._discretization  # noqa: SLF001
    return losses, probs, float(dense._infinity_mass)  # noqa: SLF001


def _hockey_stick(losses: np.ndarray, probs: np.ndarray, infinity_mass: float, epsilons: np.ndarray) -> np.ndarray:
    """delta(eps) = inf_mass + sum_{loss > eps} p (1 - e^{eps - loss}), for sorted ``epsilons``."""
    upper = np.append(np.cumsum(probs[::-1])[::-1], 0.0) + infinity_mass
    # e^eps sum_{loss > eps} p e^-loss in log space: e^eps alone overflows on wide loss ranges.
    with np.errstate(divide="ignore"):
        log_terms = np.log(probs) - losses
    log_lower = np.append(np.logaddexp.accumulate(log_terms[::-1])[::-1], -np.inf)
    first_above = np.searchsorted(losses, epsilons, side="right")
    return upper[first_above] - np.exp(epsilons + log_lower[first_above])
