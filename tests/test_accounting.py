"""The accounting layer against an independent oracle: Google's ``dp_accounting`` PLD accountant.

The oracle is the privacy-loss-distribution accountant with its default pessimistic
discretisation, i.e. itself an upper bound on the true epsilon that overshoots by a few
thousandths at ``value_discretization_interval=1e-3``. Every check of the form "we never
report less than the oracle" or "we never allow more than the oracle" is therefore slightly
*stricter* than against the exact value, never looser.
"""

from __future__ import annotations

import functools
import itertools
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from lightning_dp.core.accounting import PrivacyHistory, calibrate_noise, compute_epsilon, max_steps

DELTA = 1e-5
PRV_ERROR = 0.01  # the eps_error the PRV accountant is queried with: its stated accuracy
VDI = 1e-3  # PLD value discretisation: ~0.06 s per query, overshoots the exact epsilon by <0.005


@functools.lru_cache(maxsize=None)
def _oracle(segments: tuple[tuple[float, float, int], ...], delta: float, vdi: float) -> float:
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in segments
        if steps > 0
    ]
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=vdi)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def oracle(segments, delta: float = DELTA, vdi: float = VDI) -> float:
    """PLD epsilon of a list of ``(sigma, q, steps)`` segments (or a PrivacyHistory)."""
    if isinstance(segments, PrivacyHistory):
        segments = segments.segments
    return _oracle(tuple((float(s), float(q), int(n)) for s, q, n in segments), float(delta), float(vdi))


def oracle_max_steps(prefix: list, sigma: float, q: float, epsilon: float, hint: int = 1, delta: float = DELTA) -> int:
    """Largest n with PLD epsilon of ``prefix + [(sigma, q, n)]`` <= epsilon, by binary search.

    ``hint`` only seeds the bracket (to save PLD queries); the answer does not depend on it.
    """

    def fits(n: int) -> bool:
        return oracle(list(prefix) + [(sigma, q, n)], delta) <= epsilon

    assert fits(0)
    hint = max(hint, 1)
    if fits(hint):
        lo, hi = hint, hint + hint // 8 + 1
        while fits(hi):
            lo, hi = hi, 2 * hi
    else:
        lo, hi = hint - hint // 8 - 1, hint
        while not fits(lo):
            lo, hi = lo // 2, lo
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def assert_prv_close(ours: float, ref: float) -> None:
    """PRV is an upper bound tight to PRV_ERROR: not below the oracle beyond that, not far above."""
    assert ours >= ref - PRV_ERROR - 1e-3 * ref, f"PRV {ours} below PLD {ref} by more than its stated error"
    assert ours <= ref + 0.05 + 0.03 * ref, f"PRV {ours} absurdly above PLD {ref}"


def assert_rdp_upper(ours: float, ref: float) -> None:
    """RDP is a looser upper bound: never below the (tight) PLD figure."""
    assert ours >= ref - 1e-3, f"RDP {ours} below PLD {ref}"


# --------------------------------------------------------------------------------------------
# 1. epsilon over a grid


GRID = [
    (sigma, q, steps)
    for sigma, q, steps in itertools.product([0.8, 1.0, 2.0], [0.004, 0.05, 0.25], [1, 100, 1000])
    # q=0.25 for 1000 steps at sigma<2 is epsilon 80-130 and costs PRV 2-5 s: not worth it.
    if not (q == 0.25 and steps == 1000 and sigma < 2.0)
]


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_epsilon_matches_pld_on_grid(sigma: float, q: float, steps: int) -> None:
    ref = oracle([(sigma, q, steps)])
    prv = compute_epsilon([(sigma, q, steps)], DELTA, "prv")
    rdp = compute_epsilon([(sigma, q, steps)], DELTA, "rdp")
    assert_prv_close(prv, ref)
    assert_rdp_upper(rdp, ref)
    # A PrivacyHistory and a plain segment list are the same query.
    h = PrivacyHistory()
    h.record(sigma, q, steps)
    assert compute_epsilon(h, DELTA, "prv") == prv


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_grows_with_steps_and_shrinks_with_noise(accountant: str) -> None:
    eps = [compute_epsilon([(1.0, 0.01, n)], DELTA, accountant) for n in (10, 100, 1000)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    eps = [compute_epsilon([(s, 0.01, 100)], DELTA, accountant) for s in (0.8, 1.0, 2.0)]
    assert eps == sorted(eps, reverse=True) and eps[0] > eps[-1]


# --------------------------------------------------------------------------------------------
# 2. the DESIGN reference figures


def test_design_reference() -> None:
    segments = [(1.0, 256 / 60000, 2344)]
    pld = oracle(segments, vdi=1e-4)  # fine grid: this one is compared to a printed figure
    prv = compute_epsilon(segments, DELTA, "prv")
    rdp = compute_epsilon(segments, DELTA, "rdp")
    assert pld == pytest.approx(1.100, abs=0.01)
    assert prv == pytest.approx(1.110, abs=0.01)
    assert rdp == pytest.approx(1.352, abs=0.01)
    assert_prv_close(prv, pld)
    assert_rdp_upper(rdp, pld)
    assert pld <= prv < rdp


# --------------------------------------------------------------------------------------------
# 3. mixed histories


MIXED = [
    [(1.0, 0.01, 300), (2.0, 0.05, 200)],
    [(2.0, 0.05, 200), (1.0, 0.01, 300)],
    [(0.8, 0.004, 500), (1.5, 0.02, 100), (1.0, 0.004, 400)],
]


@pytest.mark.parametrize("segments", MIXED, ids=["two", "two-reversed", "three"])
def test_mixed_history_matches_pld_composition(segments: list) -> None:
    h = PrivacyHistory()
    for sigma, q, n in segments:
        h.record(sigma, q, n)
    assert h.segments == segments
    ref = oracle(segments)
    prv = compute_epsilon(h, DELTA, "prv")
    rdp = compute_epsilon(h, DELTA, "rdp")
    assert_prv_close(prv, ref)
    assert_rdp_upper(rdp, ref)
    # The composition costs more than any of its parts alone (guards against an accountant
    # that reads only one segment of the history).
    for seg in segments:
        assert prv > compute_epsilon([seg], DELTA, "prv") + PRV_ERROR



@pytest.mark.parametrize("segments", [*MIXED, [(1.0, 0.25, 8)]],
                         ids=["two", "two-reversed", "three", "short"])
def test_the_prv_domain_from_memoised_rdp_is_opacus_own(segments: list) -> None:
    # Our PRV accountant computes Opacus's discretisation domain from memoised RDP curves (Opacus
    # recomputes them on every query): the same domain, and the same epsilon, as Opacus's own.
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size

    from lightning_dp.core.accounting import _safe_domain_size

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in segments]
    counts = [n for _, _, n in segments]
    for delta_error in (DELTA / 1000, 1e-12):
        assert _safe_domain_size(tuple(segments), 0.01, delta_error) == compute_safe_domain_size(prvs, counts, 0.01, delta_error)
    stock = PRVAccountant()
    stock.history = list(segments)
    assert compute_epsilon(segments, DELTA, "prv") == stock.get_epsilon(delta=DELTA)


# --------------------------------------------------------------------------------------------
# 4. calibrate_noise


@pytest.mark.parametrize(
    "q,steps,target",
    # the last needs sigma < 0.5, below the first bracket [0.5, 1]
    [(0.01, 500, 0.5), (0.01, 500, 1.0), (0.1, 10, 20.0)],
)
def test_calibrate_noise_meets_target(q: float, steps: int, target: float) -> None:
    sigma = calibrate_noise(PrivacyHistory(), q, steps, epsilon=target, delta=DELTA)
    eps = compute_epsilon([(sigma, q, steps)], DELTA, "prv")
    assert 0.9 * target <= eps <= target
    assert eps >= (1 - 0.01) * target  # the documented rel_tol
    assert oracle([(sigma, q, steps)]) <= target + PRV_ERROR


def test_calibrate_noise_rdp() -> None:
    q, steps, target = 0.02, 300, 2.0
    sigma = calibrate_noise(PrivacyHistory(), q, steps, epsilon=target, delta=DELTA, accountant="rdp")
    eps = compute_epsilon([(sigma, q, steps)], DELTA, "rdp")
    assert 0.99 * target <= eps <= target
    assert oracle([(sigma, q, steps)]) <= target  # RDP is looser than PLD, so this holds outright
    # RDP is looser, so it asks for more noise than PRV for the same budget.
    assert sigma >= calibrate_noise(PrivacyHistory(), q, steps, epsilon=target, delta=DELTA, accountant="prv")


def test_calibrate_noise_on_top_of_history() -> None:
    history = PrivacyHistory([(1.0, 0.01, 1000)])
    q, steps, target = 0.02, 300, 3.0
    spent = compute_epsilon(history, DELTA)
    assert 0 < spent < target
    sigma = calibrate_noise(history, q, steps, epsilon=target, delta=DELTA)
    total = history.extended(sigma, q, steps)
    assert history.segments == [(1.0, 0.01, 1000)]  # not mutated
    eps = compute_epsilon(total, DELTA)
    assert 0.99 * target <= eps <= target
    assert oracle(total) <= target + PRV_ERROR
    # The spent part was counted: the new steps alone use clearly less than the budget
    # (calibrating them alone would have used at least 99% of it).
    assert compute_epsilon([(sigma, q, steps)], DELTA) < 0.95 * target


# --------------------------------------------------------------------------------------------
# 5. max_steps


@pytest.mark.parametrize(
    "sigma,q,target",
    [(1.0, 0.01, 1.0), (2.0, 0.05, 2.0), (0.8, 0.004, 1.0), (1.0, 256 / 60000, 1.1)],
)
def test_max_steps_against_pld(sigma: float, q: float, target: float) -> None:
    n = max_steps(PrivacyHistory(), sigma, q, target, DELTA)
    assert n > 0
    assert compute_epsilon([(sigma, q, n)], DELTA) <= target < compute_epsilon([(sigma, q, n + 1)], DELTA)
    ref = oracle_max_steps([], sigma, q, target, hint=n)
    assert n <= ref + 1, f"we allow {n} steps, the tight accountant only {ref}"
    assert n >= 0.85 * ref, f"we allow {n} steps, the tight accountant {ref}"


def test_max_steps_rdp_and_after_history() -> None:
    history = PrivacyHistory([(1.5, 0.02, 100)])
    sigma, q, target = 1.0, 0.01, 2.0
    n = max_steps(history, sigma, q, target, DELTA, accountant="rdp")
    eps = lambda k: compute_epsilon(history.extended(sigma, q, k), DELTA, "rdp")  # noqa: E731
    assert eps(n) <= target < eps(n + 1)
    ref = oracle_max_steps(history.segments, sigma, q, target, hint=n)
    assert 0.5 * ref <= n <= ref + 1  # RDP is looser: fewer steps, never more
    assert history.segments == [(1.5, 0.02, 100)]  # not mutated


def test_max_steps_limit_and_exhausted_budget() -> None:
    h = PrivacyHistory()
    assert max_steps(h, 1.0, 0.01, 3.0, DELTA, accountant="rdp", limit=10) == 10
    full = max_steps(h, 1.0, 0.01, 3.0, DELTA, accountant="rdp")
    assert full > 10
    assert max_steps(h, 1.0, 0.01, 3.0, DELTA, accountant="rdp", limit=full + 50) == full
    assert max_steps(h, 0.0, 0.01, 3.0, DELTA) == 0  # no noise: nothing is affordable
    spent = PrivacyHistory([(1.0, 0.01, 5000)])
    assert compute_epsilon(spent, DELTA, "rdp") > 3.0
    assert max_steps(spent, 1.0, 0.01, 3.0, DELTA, accountant="rdp") == 0


# --------------------------------------------------------------------------------------------
# 6. edges and bad input


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_zero_noise_is_infinite(accountant: str) -> None:
    assert compute_epsilon([(0.0, 0.01, 10)], DELTA, accountant) == math.inf


def test_zero_noise_in_mixed_history_is_infinite() -> None:
    assert compute_epsilon([(1.0, 0.01, 10), (0.0, 0.01, 1)], DELTA, "prv") == math.inf


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_empty_history_costs_nothing(accountant: str) -> None:
    assert compute_epsilon(PrivacyHistory(), DELTA, accountant) == 0.0
    assert compute_epsilon([(1.0, 0.01, 0)], DELTA, accountant) == 0.0


def test_zero_step_segments_are_ignored() -> None:
    assert compute_epsilon([(1.0, 0.01, 100), (3.0, 0.5, 0)], DELTA, "prv") == compute_epsilon(
        [(1.0, 0.01, 100)], DELTA, "prv"
    )


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5])
def test_bad_delta(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon([(1.0, 0.01, 10)], delta, "prv")


def test_unknown_accountant() -> None:
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon([(1.0, 0.01, 10)], DELTA, "pld")  # type: ignore[arg-type]


def test_gdp_refuses_mixed_history() -> None:
    with pytest.raises(ValueError, match="gdp"):
        compute_epsilon([(1.0, 0.01, 10), (2.0, 0.01, 10)], DELTA, "gdp")
    # A single segment is fine (gdp is an estimate there, not a bound).
    eps = compute_epsilon([(1.0, 256 / 60000, 2344)], DELTA, "gdp")
    assert 0 < eps < math.inf


def test_calibrate_noise_refuses_spent_budget() -> None:
    spent = PrivacyHistory([(1.0, 0.01, 5000)])
    assert compute_epsilon(spent, DELTA, "rdp") > 1.0
    with pytest.raises(ValueError, match="already spends"):
        calibrate_noise(spent, 0.01, 100, epsilon=1.0, delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(PrivacyHistory(), 0.01, 0, epsilon=1.0, delta=DELTA)


def test_record_merges_runs() -> None:
    h = PrivacyHistory()
    h.record(1.0, 0.01)
    h.record(1, 0.01, 4)  # int sigma is the same noise level
    h.record(2.0, 0.01)
    h.record(2.0, 0.02, 3)
    h.record(2.0, 0.02, 0)  # no-ops
    h.record(5.0, 0.5, -2)
    h.record(1.0, 0.01, 2)  # back to an earlier setting: a new run, not merged into the first
    assert h.segments == [(1.0, 0.01, 5), (2.0, 0.01, 1), (2.0, 0.02, 3), (1.0, 0.01, 2)]
    assert h.steps == 11
    assert all(isinstance(s, float) and isinstance(q, float) for s, q, _ in h.segments)


def test_extended_copies() -> None:
    h = PrivacyHistory([(1.0, 0.01, 5)])
    same = h.extended(1.0, 0.01, 3)
    other = h.extended(2.0, 0.01, 3)
    assert h.segments == [(1.0, 0.01, 5)]
    assert same.segments == [(1.0, 0.01, 8)]
    assert other.segments == [(1.0, 0.01, 5), (2.0, 0.01, 3)]


@pytest.mark.parametrize(
    "mine,theirs,expected",
    [
        ([], [], True),
        ([], [(1.0, 0.01, 3)], True),
        ([(1.0, 0.01, 3)], [(1.0, 0.01, 3)], True),
        ([(1.0, 0.01, 3)], [(1.0, 0.01, 7)], True),  # more steps in the same run
        ([(1.0, 0.01, 3)], [(1.0, 0.01, 3), (2.0, 0.01, 1)], True),
        ([(1.0, 0.01, 3), (2.0, 0.01, 1)], [(1.0, 0.01, 3), (2.0, 0.01, 4), (1.0, 0.01, 2)], True),
        ([(1.0, 0.01, 3)], [], False),
        ([(1.0, 0.01, 7)], [(1.0, 0.01, 3)], False),  # fewer steps than we recorded
        ([(1.0, 0.01, 3)], [(2.0, 0.01, 3)], False),  # different noise
        ([(1.0, 0.01, 3)], [(1.0, 0.02, 3)], False),  # different rate
        ([(1.0, 0.01, 3)], [(1.0, 0.01, 2), (2.0, 0.01, 1)], False),  # diverged before our end
        ([(1.0, 0.01, 2), (2.0, 0.01, 1)], [(1.0, 0.01, 3), (2.0, 0.01, 1)], False),  # earlier run differs
        ([(1.0, 0.01, 3), (2.0, 0.01, 1)], [(1.0, 0.01, 3)], False),
    ],
)
def test_is_prefix_of(mine: list, theirs: list, expected: bool) -> None:
    assert PrivacyHistory(list(mine)).is_prefix_of(PrivacyHistory(list(theirs))) is expected


def test_is_prefix_of_follows_record() -> None:
    h = PrivacyHistory()
    h.record(1.0, 0.01, 3)
    snapshot = PrivacyHistory(list(h.segments))
    h.record(1.0, 0.01, 2)
    h.record(2.0, 0.05, 1)
    assert snapshot.is_prefix_of(h)
    assert not h.is_prefix_of(snapshot)
    assert h.is_prefix_of(h)


def test_state_dict_round_trip() -> None:
    h = PrivacyHistory()
    h.record(1.0, 256 / 60000, 2344)
    h.record(0.7, 0.1, 3)
    state = json.loads(json.dumps(h.state_dict()))  # survives a plain JSON checkpoint
    restored = PrivacyHistory()
    restored.record(9.0, 0.9, 9)  # loading replaces, not appends
    restored.load_state_dict(state)
    assert restored.segments == h.segments
    assert restored == h
    assert all(isinstance(n, int) for _, _, n in restored.segments)
    assert compute_epsilon(restored, DELTA, "prv") == compute_epsilon(h, DELTA, "prv")
    # The state is a copy: mutating the history afterwards does not change it.
    state = h.state_dict()
    h.record(0.7, 0.1, 1)
    assert state["segments"][-1][2] == 3
