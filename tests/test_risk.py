"""Privacy risk in attack terms (lightning_dp.core.risk) and PrivacyBudget's risk targets.

Oracles: the Gaussian mechanism (sample rate 1) is exactly mu-GDP, mu = sqrt(sum T / sigma^2),
so its ROC bound is Phi(Phi^-1(FPR) + mu) in closed form; one Poisson-sampled Gaussian step
has an exact Neyman-Pearson test (the likelihood ratio is monotone in the output); Google's
``dp_accounting`` PLD accountant (its own DpEvent path and delta code) and Opacus's PRV
accountant are independent implementations of the privacy profile.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from conftest import Classifier, loader, make_dataset, pld_epsilon, tensorboard_scalars, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.core.accounting import PrivacyHistory, calibrate_noise, compute_epsilon, max_steps
from lightning_dp.core.risk import (
    AdvantageTarget,
    TprTarget,
    epsilon_delta_risk,
    privacy_profile,
    privacy_risk,
    risk_targets,
    tpr_bound,
)

DELTA = 1e-5
REF = [(1.1, 256 / 60000, 14063)]  # the reference run


def gdp_tpr(mu: float, fpr: float | np.ndarray) -> np.ndarray:
    return norm.sf(norm.isf(fpr) - mu)


def oracle_advantage(segments: list[tuple[float, float, int]], grid: float = 1e-4) -> float:
    """delta(eps=0) from dp_accounting's PLD accountant (DpEvents, the library's own delta)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    for sigma, q, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_delta(0.0))


# ---------------------------------------------------------------------- reference values


def test_reference_run_epsilon_and_advantage() -> None:
    """Issue 6: eps 2.38, advantage 0.2245 (PLD). Tolerances: epsilon to the grid step
    (1e-4) plus the oracle's own 1e-3 grid; advantage to 1e-4 (grid error ~1e-6, measured)."""
    profile = privacy_profile(REF)
    assert profile.epsilon(DELTA) == pytest.approx(2.38, abs=0.005)
    assert profile.epsilon(DELTA) == pytest.approx(pld_epsilon(REF, DELTA), abs=0.01)
    assert profile.advantage == pytest.approx(0.2245, abs=1e-4)
    assert profile.advantage == pytest.approx(oracle_advantage(REF), abs=1e-6)


def test_reference_run_tpr_bounds_and_the_single_point_bound() -> None:
    risk = privacy_risk(REF, fprs=(0.001, 0.01))
    # The issue quotes 0.0055 and 0.0398 (riskcal's direct method at grid 1e-4). Those fall
    # below the bound the profile implies, which converges to these values as the grid is
    # refined (4e-4 .. 5e-5: 0.006056 .. 0.006051) and which Opacus's PRV accountant
    # confirms independently (test below): 0.0055 would under-report the risk by 9%.
    assert risk.tpr_at_fpr[0.001] == pytest.approx(0.006051, abs=2e-6)
    assert risk.tpr_at_fpr[0.01] == pytest.approx(0.040208, abs=2e-6)
    assert risk.tpr_at_fpr[0.001] > 0.0055 and risk.tpr_at_fpr[0.01] > 0.0398
    # What the single (eps, delta) point alone would say (issue: 0.8309, 0.0108, 0.1083).
    point = epsilon_delta_risk(privacy_profile(REF).epsilon(DELTA), DELTA)
    assert point.advantage == pytest.approx(0.8309, abs=1e-4)
    assert point.tpr_at_fpr[0.001] == pytest.approx(0.0108, abs=1e-4)
    assert point.tpr_at_fpr[0.01] == pytest.approx(0.1083, abs=1e-4)
    assert risk.advantage < point.advantage / 3 and risk.tpr_at_fpr[0.01] < point.tpr_at_fpr[0.01] / 2


@pytest.mark.slow
def test_reference_run_tpr_bound_against_opacus_prv() -> None:
    """Opacus's PRV accountant (another numerical method) gives (eps(delta), delta) points;
    each point's line bounds TPR, so the best of a few must sit just above the profile's
    bound (within 2%), never below it."""
    ours = privacy_risk(REF, fprs=(0.001, 0.01)).tpr_at_fpr
    deltas = np.geomspace(1e-4, 3e-2, 8)
    eps = np.array([compute_epsilon(REF, float(d), "prv") for d in deltas])
    for fpr, tpr in ours.items():
        prv = float(np.min(deltas + np.exp(eps) * fpr))
        assert tpr <= prv <= 1.02 * tpr


def test_gaussian_one_step_advantage() -> None:
    """Issue 6: q=1, sigma=5, T=1 gives advantage 0.0797 = 2 Phi(1/(2 sigma)) - 1."""
    adv = privacy_profile([(5.0, 1.0, 1)]).advantage
    assert adv == pytest.approx(0.0797, abs=1e-4)
    assert adv == pytest.approx(2 * norm.cdf(0.1) - 1, abs=1e-6)


# ---------------------------------------------------------------------- exact oracles


@pytest.mark.parametrize("segments", [[(2.0, 1.0, 4)], [(8.0, 1.0, 100), (4.0, 1.0, 20)]])
def test_gaussian_compositions_match_gdp_closed_form(segments: list[tuple[float, float, int]]) -> None:
    mu = math.sqrt(sum(n / s**2 for s, _, n in segments))
    fpr = np.array([1e-4, 0.001, 0.01, 0.1, 0.3, 0.7, 0.99])
    exact = gdp_tpr(mu, fpr)
    bound = tpr_bound(segments, fpr)
    assert np.all(bound >= exact - 1e-9)  # an upper bound ...
    assert np.all(bound <= exact + 1e-4)  # ... tight to the grid
    risk = privacy_risk(segments, kappa=0.05)
    assert risk.advantage == pytest.approx(2 * norm.cdf(mu / 2) - 1, abs=1e-5)
    assert risk.reconstruction == pytest.approx(float(gdp_tpr(mu, 0.05)), abs=1e-4)
    assert risk.kappa == 0.05


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.1), (0.8, 0.3)])
def test_one_poisson_step_matches_the_neyman_pearson_test(sigma: float, q: float) -> None:
    """Member in: (1-q) N(0, s^2) + q N(1, s^2) against out: N(0, s^2); threshold tests."""
    fpr = np.array([0.001, 0.01, 0.1])
    threshold = norm.isf(fpr) * sigma
    exact = (1 - q) * fpr + q * norm.sf((threshold - 1) / sigma)
    bound = tpr_bound([(sigma, q, 1)], fpr)
    assert np.all(bound >= exact - 1e-9)
    assert np.all(bound <= exact + 2e-5)


def test_profile_deltas_match_dp_accountings_own_delta() -> None:
    """The numpy hockey-stick reads dp_accounting's dense pmfs: check it against the library."""
    from dp_accounting.pld import privacy_loss_distribution

    sigma, q, n = 2.0, 0.05, 50
    profile = privacy_profile([(sigma, q, n)])
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=profile.discretization
    ).self_compose(n)
    idx = np.searchsorted(profile.epsilons, [0.0, 0.5, 1.0, 2.0])
    expected = pld.get_delta_for_epsilon(profile.epsilons[idx])
    np.testing.assert_allclose(profile.deltas[idx], expected, rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------------- properties


def test_bounds_grow_with_steps_and_shrink_with_noise() -> None:
    by_steps = [privacy_risk([(1.0, 0.05, n)]) for n in (10, 100, 400)]
    by_noise = [privacy_risk([(s, 0.05, 100)]) for s in (0.8, 1.0, 2.0)]
    for seq, direction in ((by_steps, 1), (by_noise, -1)):
        adv = [r.advantage for r in seq]
        tpr = [r.tpr_at_fpr[0.01] for r in seq]
        assert adv == sorted(adv, reverse=direction < 0) and len(set(adv)) == 3
        assert tpr == sorted(tpr, reverse=direction < 0)


def test_roc_bound_between_chance_and_the_single_point_bound() -> None:
    fpr = np.linspace(0.0, 1.0, 101)
    bound = tpr_bound(REF, fpr)
    assert np.all(bound >= fpr) and np.all(bound <= 1.0)
    eps = privacy_profile(REF).epsilon(DELTA)
    single = np.minimum(DELTA + np.exp(eps) * fpr, 1 - np.exp(-eps) * (1 - DELTA - fpr))
    assert np.all(bound <= np.minimum(single, 1.0) + 1e-12)
    assert np.all(np.diff(bound) >= -1e-12)  # a ROC bound never decreases


def test_nothing_released_is_chance_and_no_noise_is_total_risk() -> None:
    empty = privacy_risk(PrivacyHistory(), kappa=0.2)
    assert empty.advantage == 0.0 and empty.tpr_at_fpr[0.01] == pytest.approx(0.01) and empty.reconstruction == pytest.approx(0.2)
    noiseless = privacy_risk([(0.0, 0.1, 1)])
    assert noiseless.advantage == 1.0 and noiseless.tpr_at_fpr[0.001] == 1.0
    # Infinite noise, sample rate 0 and 0 steps release nothing.
    assert privacy_risk([(math.inf, 0.1, 5), (1.0, 0.0, 5), (1.0, 0.1, 0)]).advantage == 0.0


def test_near_non_private_history_stays_bounded_and_fast() -> None:
    """A history with a huge loss range coarsens the grid (still a valid bound) instead of
    asking for tens of millions of points."""
    start = time.perf_counter()
    profile = privacy_profile([(0.3, 1.0, 1000)])
    assert time.perf_counter() - start < 5
    assert profile.discretization > 1e-4
    mu = math.sqrt(1000) / 0.3
    assert 2 * norm.cdf(mu / 2) - 1 <= profile.advantage <= 1.0


def test_profile_is_memoised() -> None:
    history = [(1.0, 0.02, 3000)]
    assert privacy_profile(history) is privacy_profile(PrivacyHistory(list(history)))  # one PLD per ledger
    start = time.perf_counter()
    for _ in range(20):
        privacy_risk(history)
    assert (time.perf_counter() - start) / 20 < 0.02  # a logging step's risk: milliseconds


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: privacy_risk(REF, fprs=(0.0,)), "false-positive rate"),
        (lambda: privacy_risk(REF, fprs=(1.0,)), "false-positive rate"),
        (lambda: privacy_risk(REF, fprs=0.01), "sequence"),
        (lambda: privacy_risk(REF, kappa=1.0), "kappa"),
        (lambda: privacy_risk(REF, kappa=0), "kappa"),
        (lambda: privacy_risk([(-1.0, 0.1, 5)]), "noise_multiplier >= 0"),
        (lambda: privacy_risk([(1.0, 1.5, 5)]), "sample_rate in"),
        (lambda: privacy_risk([(1.0, 0.1, 2.5)]), "integer"),
        (lambda: privacy_risk([(1.0, 0.1)]), "segments"),
        (lambda: tpr_bound(REF, [0.5, 1.5]), r"\[0, 1\]"),
        (lambda: privacy_profile(REF).epsilon(0.0), "delta"),
        (lambda: epsilon_delta_risk(-1.0, DELTA), "epsilon"),
        (lambda: epsilon_delta_risk(1.0, 1.0), "delta"),
        (lambda: AdvantageTarget(0.0), "max_advantage"),
        (lambda: AdvantageTarget(1.0), "max_advantage"),
        (lambda: TprTarget(0.0, 0.5), "false-positive rate"),
        (lambda: TprTarget(0.01, 0.01), "above its"),
        (lambda: TprTarget(0.01, 1.0), "below 1"),
        (lambda: risk_targets(max_tpr_at_fpr={}), "non-empty dict"),
        (lambda: risk_targets(max_tpr_at_fpr=[(0.01, 0.05)]), "non-empty dict"),
        (lambda: max_steps(PrivacyHistory(), 1.0, 0.1), "nothing to hold"),
        (lambda: max_steps(PrivacyHistory(), 1.0, 0.1, epsilon=1.0), "needs its delta"),
        (lambda: calibrate_noise(PrivacyHistory(), 0.1, 10), "nothing to hold"),
    ],
)
def test_bad_input_is_refused_with_what_to_change(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta": DELTA}, "needs a budget"),
        ({"max_advantage": 0.1}, "needs delta"),
        ({"delta": DELTA, "max_advantage": 0.0}, "max_advantage must be"),
        ({"delta": DELTA, "max_advantage": 1.2}, "max_advantage must be"),
        ({"delta": DELTA, "max_tpr_at_fpr": {1.0: 0.5}}, "false-positive rate"),
        ({"delta": DELTA, "max_tpr_at_fpr": {-0.1: 0.5}}, "false-positive rate"),
        ({"delta": DELTA, "max_tpr_at_fpr": {0.05: 0.01}}, "above its false-positive rate"),
        ({"delta": DELTA, "max_tpr_at_fpr": {}}, "non-empty dict"),
        ({"delta": DELTA, "max_advantage": 0.1, "kappa": 1.0}, "kappa"),
        ({"epsilon": -1.0, "delta": DELTA, "max_advantage": 0.1}, "epsilon must be"),
    ],
)
def test_privacy_budget_refuses_bad_risk_targets(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyBudget(**kwargs)


# ---------------------------------------------------------------------- planning with targets


def test_max_steps_for_an_advantage_target_matches_the_closed_form() -> None:
    # Gaussian, sigma=20: advantage 2 Phi(sqrt(n)/40) - 1 is 0.0995 at n=25 and 0.1014 at n=26.
    assert max_steps(PrivacyHistory(), 20.0, 1.0, targets=[AdvantageTarget(0.1)]) == 25
    # Several targets: the tightest binds (epsilon 0.9 at delta 1e-5 allows fewer steps).
    both = max_steps(PrivacyHistory(), 20.0, 1.0, 0.9, DELTA, "rdp", targets=[AdvantageTarget(0.1)])
    assert both == max_steps(PrivacyHistory(), 20.0, 1.0, 0.9, DELTA, "rdp") < 25


def test_calibrate_noise_to_an_advantage_target_meets_it_within_tolerance() -> None:
    sigma = calibrate_noise(PrivacyHistory(), 1.0, 100, targets=[AdvantageTarget(0.1)])
    exact = 2 * norm.cdf(math.sqrt(100) / sigma / 2) - 1
    assert 0.0989 <= exact <= 0.1  # rel_tol 1%, less the grid's pessimism (~1e-6)
    sigma_tpr = calibrate_noise(PrivacyHistory(), 1.0, 100, targets=[TprTarget(0.01, 0.05)])
    assert 0.05 * 0.985 <= float(gdp_tpr(math.sqrt(100) / sigma_tpr, 0.01)) <= 0.05


# ---------------------------------------------------------------------- PrivacyBudget end to end




@pytest.mark.slow
def test_advantage_target_stops_before_it_would_be_exceeded_and_logs_risk(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    sigma, q, target = 2.0, 8 / 64, 0.1
    budget = PrivacyBudget(delta=DELTA, max_advantage=target, kappa=0.01, report=False)
    t = trainer(max_epochs=100, strategy=DPStrategy(noise_multiplier=sigma), callbacks=[budget],
                logger=TensorBoardLogger(tmp_path, name="run"), log_every_n_steps=5)
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    steps = budget.steps
    assert t.global_step == steps and 10 < steps < 800
    assert oracle_advantage([(sigma, q, steps)]) <= target
    assert oracle_advantage([(sigma, q, steps + 1)]) > target  # one more step would exceed it
    assert "advantage=" in budget.stopped_reason
    risk = budget.risk
    assert risk.advantage <= target and risk.kappa == 0.01
    scalars = tensorboard_scalars(tmp_path)
    for tag in ("dp/epsilon", "dp/risk/advantage", "dp/risk/tpr_at_fpr_0.001", "dp/risk/tpr_at_fpr_0.01",
                "dp/risk/reconstruction"):
        assert tag in scalars, tag
    logged_steps = dict(scalars["dp/steps"])
    for step, value in scalars["dp/risk/advantage"]:
        n = int(logged_steps[step])
        # From the plan's table: an upper bound, at most the next table point's (k <= 1.3 n here).
        assert oracle_advantage([(sigma, q, n)]) - 1e-4 <= value <= oracle_advantage([(sigma, q, int(1.3 * n) + 2)]) + 1e-3
    tprs = [v for _, v in scalars["dp/risk/tpr_at_fpr_0.01"]]
    assert tprs == sorted(tprs) and all(0.01 <= v <= 1 for v in tprs)
    # The state carries the target: a fresh callback restored from it enforces it.
    resumed = PrivacyBudget(epsilon=50.0, delta=DELTA)
    with pytest.warns(UserWarning, match="enforcing advantage<=0.1"):
        resumed.load_state_dict(budget.state_dict())
    assert resumed.max_advantage == target and resumed.steps == steps


@pytest.mark.slow
def test_calibrated_noise_meets_advantage_and_tpr_targets_over_the_plan() -> None:
    q = 8 / 64
    budget = PrivacyBudget(delta=DELTA, max_advantage=0.2, max_tpr_at_fpr={0.01: 0.06}, report=False)
    t = trainer(max_epochs=2, strategy=DPStrategy(), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == 16  # the whole plan ran
    history = [(budget.noise_multiplier, q, 16)]
    adv, tpr = oracle_advantage(history), privacy_risk(history).tpr_at_fpr[0.01]
    assert adv <= 0.2 and tpr <= 0.06
    assert adv >= 0.99 * 0.2 or tpr >= 0.99 * 0.06  # the binding target is used, to 1%
    assert budget.risk.tpr_at_fpr[0.01] == pytest.approx(tpr)
    state = budget.state_dict()
    assert state["max_advantage"] == 0.2 and state["max_tpr_at_fpr"] == {0.01: 0.06}
