"""DPDDPStrategy with real processes: 2 CPU ranks over gloo, launched by Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Classifier, clipped_sum, per_example_grads, pld_epsilon
from lightning_dp import DPDDPStrategy
from lightning_dp.core.accounting import compute_epsilon

SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"
pytestmark = pytest.mark.slow


# Every scenario, in one pair of processes (see tests/ddp_run.py); the two that must be refused last.
SCENARIOS = ("update", "noise", "budget", "stop", "first", "resume", "empty", "ledger", "users",
             "ledger_refused", "users_mismatch")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_dp import PrivacyLedger

    root = tmp_path_factory.mktemp("ddp")
    PrivacyLedger(str(root / "ledger.db"), "patients", epsilon=8.0, delta=1e-6)  # for "ledger"
    # cwd: the scenarios without a logger write their privacy reports there (a module fixture runs
    # before conftest's per-test chdir into tmp_path).
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root), *SCENARIOS], capture_output=True, text=True,
                          timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def outcome(root: Path, scenario: str) -> list[dict]:
    return [torch.load(root / scenario / f"rank{r}.pt", weights_only=False) for r in range(2)]


def run(scenario: str, root: Path) -> list[dict]:
    ranks = outcome(root, scenario)
    for r in ranks:
        assert "error" not in r, r.get("error")
    return ranks


def test_update_is_the_clipped_mean_over_both_processes_examples(root: Path) -> None:
    ranks = run("update", root)
    for r in ranks:  # the same update on every process
        for a, b in zip(ranks[0]["after"], r["after"]):
            torch.testing.assert_close(a, b)
    assert ranks[0]["sample_rate"] == 2 * 8 / 64  # the global rate q = W*b/N
    x = torch.cat([r["x"] for r in ranks])
    y = torch.cat([r["y"] for r in ranks])
    assert len(x) > 0 and all(len(r["x"]) > 0 for r in ranks)
    # disjoint shards: no example drawn by both processes
    assert len({tuple(row.tolist()) for row in x}) == len(x)
    reference = Classifier()
    with torch.no_grad():
        for p, v in zip(reference.parameters(), ranks[0]["before"]):
            p.copy_(v)
    grads = per_example_grads(reference, x, y, reference.loss)
    expected = [g / 16 for g in clipped_sum(grads, 0.1, list(reference.parameters()))]  # / (q * N)
    for b, a, e in zip(ranks[0]["before"], ranks[0]["after"], expected):
        torch.testing.assert_close(b - a, e, rtol=1e-4, atol=1e-6)


def test_noise_is_added_once_not_once_per_process(root: Path) -> None:
    ranks = run("noise", root)
    delta = torch.cat([(b - a).flatten() for b, a in zip(ranks[0]["before"], ranks[0]["after"])])
    for b0, a1 in zip(ranks[0]["after"], ranks[1]["after"]):
        torch.testing.assert_close(b0, a1)
    expected = 1.5 * 2.0 / (2 * 8)  # sigma * C / (q * N); twice the noise would be 41% larger
    assert abs(delta.std().item() / expected - 1) < 0.05


def test_budget_run_matches_an_independent_accountant_at_the_global_rate(root: Path) -> None:
    ranks = run("budget", root)
    r0, r1 = ranks
    assert r0["history"] == r1["history"] and r0["epsilon"] == r1["epsilon"]
    assert r0["global_step"] == r1["global_step"] == r0["steps"] == 8  # 2 epochs of ceil(64 / 16)
    sigma, q = r0["noise_multiplier"], r0["sample_rate"]
    assert q == 0.25 and r0["history"] == [(sigma, q, 8)]
    assert r0["epsilon"] == pytest.approx(compute_epsilon([(sigma, q, 8)], 1e-5))
    assert 1.8 <= r0["epsilon"] <= 2.0
    assert pld_epsilon([(sigma, q, 8)], 1e-5) <= 2.0 + 0.01


def test_budget_stops_every_process_at_the_same_step_before_overspending(root: Path) -> None:
    ranks = run("stop", root)
    steps = ranks[0]["steps"]
    assert 1 < steps < 50 * 4  # the budget ended the run, long before its 50 epochs
    for r in ranks:
        assert r["global_step"] == r["steps"] == steps and r["epsilon"] <= 6.0
    assert compute_epsilon([(1.0, 0.25, steps + 1)], 1e-5) > 6.0


def test_resume_continues_the_ledger_on_every_process(root: Path) -> None:
    first = run("first", root)
    assert first[0]["steps"] == first[1]["steps"] == 8
    resumed = run("resume", root)
    for r in resumed:
        assert r["global_step"] == r["steps"] == 16
        assert r["epsilon"] == pytest.approx(compute_epsilon([(1.0, 0.25, 16)], 1e-5))


def test_a_process_drawing_empty_batches_does_not_hang(root: Path) -> None:
    ranks = run("empty", root)  # the subprocess timeout turns a hang into a failure
    sizes = [r["sizes"] for r in ranks]
    assert len(sizes[0]) == len(sizes[1]) == 16 == ranks[0]["global_step"] == ranks[1]["global_step"]
    assert any((a == 0) != (b == 0) for a, b in zip(*sizes))  # steps where only one process was empty
    assert ranks[0]["history"] == [(1.0, 2 / 16, 16)]
    for a, b in zip(ranks[0]["after"], ranks[1]["after"]):
        torch.testing.assert_close(a, b)


def test_registered_by_name_and_validated() -> None:
    import lightning as L

    assert isinstance(L.Trainer(strategy="dp_ddp", accelerator="cpu", devices=2, logger=False).strategy, DPDDPStrategy)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPDDPStrategy(max_grad_norm=0)


def test_only_rank_zero_talks_to_the_ledger_and_a_refusal_stops_every_rank(root: Path) -> None:
    from lightning_dp import PrivacyLedger
    from lightning_dp.core.history import PrivacyHistory

    ledger = PrivacyLedger(str(root / "ledger.db"), "patients")
    ranks = run("ledger", root)
    (record,) = ledger.runs()  # one run, not one per process
    assert record.status == "finished" and record.steps == ranks[0]["steps"] == ranks[1]["steps"] > 0
    history = PrivacyHistory([tuple(s) for s in ranks[0]["history"]])
    assert record.committed == pytest.approx(tuple(ledger.curve_of(history)))
    # A plan that does not fit: both processes stop before their first step (none hangs: the
    # scenarios after it ran).
    for r in outcome(root, "ledger_refused"):
        assert "does not fit in what remains" in r["error"]
    assert len(ledger.runs()) == 1


def test_user_level_shards_by_user_and_clips_each_users_sum(root: Path) -> None:
    from test_user_level import brute_force

    ranks = run("users", root)
    for r in ranks:
        for a, b in zip(ranks[0]["after"], r["after"]):
            torch.testing.assert_close(a, b)  # the same update on every process
    assert ranks[0]["sample_rate"] == 1.0
    model = Classifier(lr=1.0)
    model.load_state_dict({k: v for k, v in zip(dict(model.named_parameters()), ranks[0]["before"])}, strict=False)
    total = [torch.zeros_like(p) for p in model.parameters()]
    users = 0
    for r in ranks:
        units = [n for chunk in r["units"][0] for n in chunk]
        users += len(units)
        for acc, g in zip(total, brute_force(model, r["x"], r["y"], units, r["expected"][0])):
            acc += g
    assert users == 8  # each user on exactly one process
    for before, after, g in zip(ranks[0]["before"], ranks[0]["after"], total):
        torch.testing.assert_close(before - after, g, rtol=1e-4, atol=1e-7)  # SGD, lr 1

    # Processes that compute other user ids (another order) could shard one person twice: refused on
    # every process, none left waiting.
    for r in outcome(root, "users_mismatch"):
        assert "computed different user ids" in r["error"]
