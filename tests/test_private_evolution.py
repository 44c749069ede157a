"""Private Evolution: the Gaussian-DP accounting against the reference figures and independent
accountants, the histogram's sensitivity, the noise, the threshold and selection, the private data
read in the histogram only, class fractions, the ledger, and two processes voting on shards."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from lightning_dp import PrivacyLedger
from lightning_dp.core.accounting import compute_epsilon
from lightning_dp.core.gaussian_dp import calibrate_noise_multiplier, gdp_epsilon, gdp_mu
from lightning_dp.mechanism.private_evolution import PrivateVotes, vote_histogram
from lightning_dp.report import PrivacyRecord, build_report
from pe_toys import private_set, random_api, toy_evolution, variation_api

HERE = Path(__file__).resolve().parent


def _pld_epsilon(sigma: float, releases: int, delta: float, interval: float = 1e-3) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=interval)
    accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
    return accountant.get_epsilon(delta)


def test_gdp_accounting_reproduces_aug_pe_and_agrees_with_independent_accountants() -> None:
    n = 1_939_290
    yelp_delta = 1 / (n * math.log(n))
    assert gdp_epsilon(gdp_mu(15.34, 10), yelp_delta) == pytest.approx(1.004455, abs=5e-7)  # Aug-PE's Yelp figure
    assert gdp_epsilon(gdp_mu(5 * math.sqrt(2), 20), 1e-5) == pytest.approx(2.594383, abs=5e-7)  # DPSDA CIFAR-10
    for sigma, releases, delta in [(15.34, 10, yelp_delta), (3.42, 10, 1e-5), (1.0, 3, 1e-6)]:
        exact = gdp_epsilon(gdp_mu(sigma, releases), delta)
        assert exact == pytest.approx(_pld_epsilon(sigma, releases, delta, 1e-4), rel=1e-4)  # dp_accounting's PLD
        rdp_acc = rdp.RdpAccountant()
        rdp_acc.compose(dp_event.GaussianDpEvent(sigma), releases)
        assert exact <= rdp_acc.get_epsilon(delta)  # RDP is a looser bound of the same mechanism
        # Opacus's PRV accountant composes the same releases (as rate-1 sampled Gaussians): within 0.02.
        assert compute_epsilon([(sigma, 1.0, releases)], delta, "prv") == pytest.approx(exact, abs=0.02)
    sigma = calibrate_noise_multiplier(4.0, 1e-5, 10)
    assert gdp_epsilon(gdp_mu(sigma, 10), 1e-5) == pytest.approx(4.0, abs=1e-8)
    assert gdp_epsilon(gdp_mu(sigma, 10), 1e-5) <= 4.0 + 1e-12
    assert gdp_epsilon(gdp_mu(sigma * 0.999, 10), 1e-5) > 4.0  # the smallest noise that fits
    far = gdp_epsilon(gdp_mu(1.0, 900), 1e-5)  # mu = 30: e^epsilon overflows a float; pe's formula returns 0 there
    assert 500 < far < 1000 and far == pytest.approx(_pld_epsilon(1.0, 900, 1e-5, 1e-2), rel=1e-2)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_one_private_sample_moves_the_clean_histogram_by_exactly_norm_one(k: int, distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    private, synthetic = torch.randn(50, 4, generator=g), torch.randn(20, 4, generator=g)
    full = vote_histogram(private, synthetic, k, distance, chunk_size=7)
    for i in range(0, 50, 7):
        without = vote_histogram(torch.cat([private[:i], private[i + 1:]]), synthetic, k, distance, chunk_size=7)
        assert float(torch.linalg.vector_norm(full - without)) == pytest.approx(1.0, abs=1e-12)
    assert float(full.sum()) == pytest.approx(50 * k / math.sqrt(k))
    # The chunked search equals one brute-force pass.
    brute = torch.zeros(20, dtype=torch.float64)
    for row in private:
        d = ((synthetic - row) ** 2).sum(1) if distance == "l2" else -torch.nn.functional.cosine_similarity(
            synthetic, row[None], dim=1)
        brute[d.topk(k, largest=False).indices] += 1 / math.sqrt(k)
    assert torch.allclose(full, brute)


class _Recording(PrivateVotes):
    log: list = []

    def histograms(self, population_embeddings):  # type: ignore[no-untyped-def]
        out = super().histograms(population_embeddings)
        _Recording.log.append({c: h.clone() for c, h in out.items()})
        return out


def _record_votes(pe) -> None:  # type: ignore[no-untyped-def]
    """Make ``pe`` record its clean histograms in ``_Recording.log`` (emptied here)."""

    class Recorded(type(pe)):  # type: ignore[misc]
        def _votes(self, private_x, private_y):  # type: ignore[no-untyped-def]
            return _Recording(private_x, private_y, self.classes, self.embed, 1, "l2", 4096, None)

    pe.__class__ = Recorded
    _Recording.log = []


def test_the_noise_has_the_calibrated_standard_deviation_on_every_bin() -> None:
    x, y = private_set()
    pe = toy_evolution(num_samples=30000, iterations=1, epsilon=1.0)
    _record_votes(pe)
    result = pe.fit(x, y)
    noise = torch.cat([result.noisy_histograms[0][c] - _Recording.log[0][c] for c in range(3)])
    assert noise.numel() == 30000
    assert float(noise.std()) == pytest.approx(pe.noise_multiplier, rel=0.03)
    assert abs(float(noise.mean())) < 4 * pe.noise_multiplier / math.sqrt(30000)
    assert pe.noise_multiplier == pytest.approx(calibrate_noise_multiplier(1.0, 1e-5, 1))


def test_threshold_and_selection_follow_the_thresholded_counts() -> None:
    # One class; a population of 4 points; the private points sit on them with 0, 3, 6 and 12 votes;
    # almost no noise; the threshold 4 leaves 0, 0, 2, 8: the parents follow 2 : 8 and never the others.
    population = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    private = torch.cat([population[1].repeat(3, 1), population[2].repeat(6, 1), population[3].repeat(12, 1)])
    from lightning_dp.mechanism.private_evolution import PrivateEvolution

    pe = PrivateEvolution(lambda c, n: population.clone(), lambda s, strength: s.clone(), embed=lambda s: s,
                          num_samples=4, iterations=1, noise_multiplier=1e-9, threshold=4.0, final_samples=20000,
                          progress=False, generator=torch.Generator().manual_seed(0))
    result = pe.fit(private)
    picked = result.samples[:, 0].round().long().tolist()
    counts = {v: picked.count(v) for v in (0, 10, 20, 30)}
    assert counts[0] == counts[10] == 0
    assert counts[30] / 20000 == pytest.approx(0.8, abs=0.015)  # 8 / (2 + 8), 5 standard errors
    rank = PrivateEvolution(lambda c, n: population.clone(), lambda s, strength: s.clone(), embed=lambda s: s,
                            num_samples=4, iterations=1, noise_multiplier=1e-9, selection="rank",
                            variations_per_parent=2, progress=False).fit(private)
    assert sorted(rank.samples[:, 0].round().long().tolist()) == [0, 0, 10, 10, 20, 20, 30, 30]  # the top 4, twice
    with pytest.raises(ValueError, match="selects everything"):
        PrivateEvolution(lambda c, n: population, lambda s, t: s, embed=lambda s: s, num_samples=4, iterations=1,
                         epsilon=1.0, selection="rank")


def test_an_all_zero_histogram_falls_back_to_uniform_selection_and_is_counted() -> None:
    x, y = private_set()
    with pytest.warns(UserWarning, match="no count above the threshold"):
        result = toy_evolution(threshold=1e9, iterations=2).fit(x, y)
    assert result.fallbacks == 6 and len(result.samples) == 60  # 3 classes x 2 iterations


class _Replay(PrivateVotes):
    """Votes that return recorded clean histograms: the private data is never given to it."""

    def __init__(self, recorded: list) -> None:  # noqa: D107
        self.recorded = list(recorded)

    def histograms(self, population_embeddings):  # type: ignore[no-untyped-def]
        return self.recorded.pop(0)


class _Poison:
    """A private set that fails the test when anything reads it."""

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the private data was read outside the histogram ({name})")

    def __len__(self) -> int:
        raise AssertionError("the private data was read outside the histogram (len)")


def test_the_private_data_is_read_only_inside_the_histogram() -> None:
    x, y = private_set()
    pe = toy_evolution()
    _record_votes(pe)
    first = pe.fit(x, y)
    recorded = list(_Recording.log)
    replay = toy_evolution()

    class Replayed(type(replay)):  # type: ignore[misc]
        def _votes(self, private_x, private_y):  # type: ignore[no-untyped-def]
            return _Replay(recorded)

    replay.__class__ = Replayed
    second = replay.fit(_Poison(), None)  # the same clean histograms, no private data at all
    assert torch.equal(first.samples, second.samples) and torch.equal(first.labels, second.labels)
    # And the samples did move towards the private data (the check is not vacuous).
    start = torch.cat([random_api(c, 20) for c in range(3)])
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    gap = lambda s, labels: float((s - centres[labels]).norm(dim=1).mean())  # noqa: E731
    assert gap(first.samples, first.labels) < 0.6 * gap(start, first.labels)


def test_class_fractions_are_public_input_or_released_with_noise() -> None:
    x, y = private_set(300)
    skewed = torch.cat([torch.zeros(240, dtype=torch.long), torch.tensor([1] * 30 + [2] * 30)])
    uniform = toy_evolution(num_samples=60).fit(x, skewed)
    assert torch.bincount(uniform.labels).tolist() == [20, 20, 20]  # the private 80/10/10 was not read
    given = toy_evolution(num_samples=60, class_fractions=[0.5, 0.25, 0.25]).fit(x, skewed)
    assert torch.bincount(given.labels).tolist() == [30, 15, 15]
    private = toy_evolution(num_samples=60, class_fractions="private", epsilon=8.0).fit(x, skewed)
    assert private.releases == 5 and private.epsilon == pytest.approx(8.0, abs=1e-8)  # T + 1 releases
    assert torch.bincount(private.labels)[0] > 35  # the noisy counts follow the private 80 %
    with pytest.raises(ValueError, match="no `classes`"):
        toy_evolution(classes=None).fit(x, y)
    with pytest.raises(ValueError, match="not among the public classes"):
        toy_evolution(classes=[0, 1]).fit(x, y)
    with pytest.raises(ValueError, match="class_fractions must be"):
        toy_evolution(class_fractions=[1.0, 0.0])
    with pytest.raises(ValueError, match="exactly one of epsilon"):
        toy_evolution(noise_multiplier=2.0)


def test_the_ledger_is_charged_what_was_released_even_when_the_job_fails(tmp_path: Path) -> None:
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "points", epsilon=20.0, delta=1e-5)
    x, y = private_set()
    result = toy_evolution(ledger=ledger, name="pe-ok").fit(x, y)
    calls = {"n": 0}

    def failing(samples: torch.Tensor, strength: float) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the variation API went away")
        return variation_api(samples, strength)

    failing_pe = toy_evolution(ledger=ledger, name="pe-failed", classes=[0])
    failing_pe.variation_api = failing
    with pytest.raises(RuntimeError, match="went away"):
        failing_pe.fit(x[y == 0], y[y == 0])
    runs = {r.name: r for r in ledger.runs()}
    assert runs["pe-ok"].kind == "private_evolution" and runs["pe-ok"].steps == result.releases == 4
    assert runs["pe-failed"].steps == 2 and runs["pe-failed"].status == "finished"  # two histograms were released
    report = build_report(PrivacyRecord.of_service(result))  # the releases' exact figure, as the job reports it
    assert report["epsilon"] == pytest.approx(result.epsilon, abs=1e-9) and report["steps"] == 4


def test_inputs_that_would_raise_the_sensitivity_or_leak_through_an_error_are_refused() -> None:
    x, y = private_set()
    # An embedder returning one row per chunk of a sample would give that sample several votes.
    doubled = toy_evolution()
    doubled.private_embed = lambda s: torch.cat([s, s])
    with pytest.raises(ValueError, match="one row per sample"):
        doubled.fit(x, y)
    # Labels are matched by ==: classes equal as values would each get the same sample's votes.
    with pytest.raises(ValueError, match="distinct"):
        toy_evolution(classes=[0, 0.0, 2])
    with pytest.raises(TypeError, match="plain hashable"):
        toy_evolution(classes=[torch.tensor(0), 1, 2])
    # Too many neighbours for a class population: refused before any private data is read.
    with pytest.raises(ValueError, match="smallest class population"):
        toy_evolution(num_neighbors=25).fit(_Poison(), None)
    # Private fractions of a single class release nothing and cost nothing.
    single = toy_evolution(classes=None, class_fractions="private")
    assert single.releases == single.iterations


def test_metric_and_progress_history() -> None:
    x, y = private_set()
    result = toy_evolution(metric=lambda s, labels: float(s.norm(dim=1).mean())).fit(x, y)
    assert [h["iteration"] for h in result.history] == [1, 2, 3, 4]
    assert all(h["metric"] is not None for h in result.history)
    eps = [h["epsilon"] for h in result.history]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(4.0, abs=1e-8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_voting_on_shards_equal_one_process(tmp_path: Path) -> None:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "pe_dist_run.py"), str(r), "2", str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = private_set()
    population = {c: torch.randn(30, 2, generator=torch.Generator().manual_seed(c)) for c in range(3)}
    one = PrivateVotes(x, y, [0, 1, 2], lambda s: s, 2, "l2", 7, None).histograms(population)
    for r in ranks:  # before noise, the summed shards equal the whole set's histogram
        assert all(torch.equal(r["clean"][c], one[c]) for c in range(3))
    single = toy_evolution().fit(x, y)  # noise added once, by rank 0: the same run as one process
    for r in ranks:
        assert torch.equal(r["samples"], single.samples) and torch.equal(r["labels"], single.labels)
        assert torch.equal(r["whole"], single.samples)  # copies of the whole set are not summed (counted twice)
    with pytest.raises(ValueError, match="process group"):
        toy_evolution().fit(x, y, sharded=True)
    # One job on two processes is one entry in the dataset's ledger (rank 0 speaks for it), not two.
    (run,) = PrivacyLedger(str(tmp_path / "ledger.db"), "points", epsilon=20.0, delta=1e-5).runs()
    assert run.steps == 4 and run.status == "finished"


def test_lookahead_embeds_each_sample_as_the_mean_of_its_variations() -> None:
    from lightning_dp.mechanism.private_evolution import PrivateEvolution

    population = torch.tensor([[0.0], [5.0]])
    calls = {"n": 0}

    def shift(samples: torch.Tensor, strength: float) -> torch.Tensor:
        calls["n"] += 1
        return samples + 5.0  # every variation moves a sample by +5

    private = torch.full((10, 1), 5.0)
    hist = {}
    for lookahead in (0, 3):
        calls["n"] = 0
        pe = PrivateEvolution(lambda c, n: population.clone(), shift, embed=lambda s: s, num_samples=2, iterations=1,
                              noise_multiplier=1e-9, lookahead=lookahead, progress=False)
        hist[lookahead] = pe.fit(private).noisy_histograms[0][None]
        assert calls["n"] == lookahead + 1  # the lookahead's variations, then the next population's
    assert hist[0].round().tolist() == [0.0, 10.0]  # itself: the private points sit on sample 1
    assert hist[3].round().tolist() == [10.0, 0.0]  # its variations (0 -> 5) sit on them: sample 0
