"""A dataset's ledger under real training: PrivacyBudget(ledger=...) reserves before the first
step, commits at checkpoints and at the end, releases what it did not use, continues on resume,
and a run killed with SIGKILL loses no spend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Classifier, loader, make_dataset, snapshot, trainer
from lightning_dp import DPStrategy, PrivacyBudget, PrivacyLedger
from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.ledger import LedgerError, LedgerRefused

DELTA = 1e-6
HERE = Path(__file__).resolve().parent


class Counting(Classifier):
    def __init__(self) -> None:
        super().__init__(lr=0.5)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx)


def fit(ledger: PrivacyLedger, tmp_path: Path, epsilon=2.0, max_steps: int = 6, name: str = "run", ckpt=None,
        model=None, **strategy):
    budget = PrivacyBudget(epsilon=epsilon, delta=DELTA, ledger=ledger, run_name=name)
    if epsilon is not None:
        strategy.setdefault("noise_multiplier", 2.0)
    t = trainer(max_steps=max_steps, default_root_dir=tmp_path, strategy=DPStrategy(**strategy), callbacks=[budget])
    model = model or Classifier()
    t.fit(model, loader(make_dataset(n=64), batch_size=8), ckpt_path=ckpt)
    return t, budget, model


def test_a_run_that_does_not_fit_is_refused_before_its_first_step(ledger_target: str, tmp_path: Path) -> None:
    ledger = PrivacyLedger(ledger_target, "patients", epsilon=1.0, delta=DELTA)
    model = Counting()
    before = snapshot(model)
    with pytest.raises(LedgerRefused, match="does not fit in what remains"):
        fit(ledger, tmp_path, epsilon=8.0, max_steps=200, model=model, noise_multiplier=0.6)
    assert model.calls == 0  # the data was never touched (not even by the start-of-fit check)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert ledger.runs() == [] and ledger.spent() == 0.0


def test_commit_and_release_at_the_end_and_the_report_shows_the_ledger(ledger_target: str, tmp_path: Path) -> None:
    ledger = PrivacyLedger(ledger_target, "patients", epsilon=8.0, delta=DELTA)
    t, budget, _ = fit(ledger, tmp_path, max_steps=6)
    (run,) = ledger.runs()
    assert (run.name, run.status, run.steps) == ("run", "finished", 6)
    assert run.epsilon == pytest.approx(budget.epsilon_spent)
    executed = ledger.curve_of(budget.history)
    assert np.allclose(run.committed, executed) and not any(run.outstanding)
    assert ledger.spent() == pytest.approx(ledger.rule.epsilon_spent(executed))
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["dataset_ledger"]["dataset"] == "patients"
    assert report["dataset_ledger"]["spent"] == pytest.approx(ledger.spent())
    assert ledger.verify() == []


def test_a_run_without_its_own_epsilon_spends_what_remains(tmp_path: Path) -> None:
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "patients", epsilon=3.0, delta=DELTA)
    fit(ledger, tmp_path / "a", max_steps=10, name="first")
    before = ledger.spent()
    t, budget, _ = fit(ledger, tmp_path / "b", epsilon=None, max_steps=10, name="the rest")
    assert budget.noise_multiplier is not None and budget.noise_multiplier < 10
    assert before < ledger.spent() <= 3.0
    # The calibrated run fills what remained at some order: the filter admits nothing more of its size.
    assert ledger.spent() > 0.9 * 3.0


def test_a_resume_is_charged_for_its_own_steps_in_the_same_runs_lineage(tmp_path: Path) -> None:
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "patients", epsilon=8.0, delta=DELTA)
    t, budget, _ = fit(ledger, tmp_path, max_steps=3)
    t.save_checkpoint(tmp_path / "a.ckpt")
    fit(ledger, tmp_path, max_steps=6, ckpt=tmp_path / "a.ckpt")
    first, resumed = ledger.runs()
    assert first.lineage == resumed.lineage == budget.run_id
    assert (first.status, resumed.status, resumed.steps) == ("finished", "finished", 6)
    assert np.allclose(np.add(first.committed, resumed.committed), ledger.curve_of(PrivacyHistory([(2.0, 0.125, 6)])))


def test_branches_from_one_checkpoint_are_each_charged(tmp_path: Path) -> None:
    # Review 14: four branches from a step-3 checkpoint were charged as one.
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "patients", epsilon=8.0, delta=DELTA)
    t, _, _ = fit(ledger, tmp_path, max_steps=3)
    t.save_checkpoint(tmp_path / "a.ckpt")
    for branch in range(3):
        fit(ledger, tmp_path / f"b{branch}", max_steps=6, ckpt=tmp_path / "a.ckpt")
    total = np.sum([r.committed for r in ledger.runs()], axis=0)
    assert np.allclose(total, ledger.curve_of(PrivacyHistory([(2.0, 0.125, 3 + 3 * 3)])))


class FailsAtStep3(Classifier):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            raise RuntimeError("out of memory, say")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_fails_commits_what_ran_and_frees_the_rest(tmp_path: Path) -> None:
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "patients", epsilon=8.0, delta=DELTA)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(ledger, tmp_path, max_steps=20, model=FailsAtStep3())
    (run,) = ledger.runs()
    assert run.status == "finished" and run.steps == 2 and not any(run.outstanding)
    assert np.allclose(run.committed, ledger.curve_of(PrivacyHistory([(2.0, 0.125, 2)])))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_loses_no_spend(ledger_target: str, tmp_path: Path) -> None:
    PrivacyLedger(ledger_target, "patients", epsilon=8.0, delta=DELTA).close()
    proc = subprocess.run([sys.executable, str(HERE / "ledger_run.py"), ledger_target, "patients", str(tmp_path),
                           "--kill-at-step", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "steps").read_text() == "4"
    ledger = PrivacyLedger(ledger_target, "patients")
    (run,) = ledger.runs()
    executed = ledger.curve_of(PrivacyHistory([(2.0, 0.125, 4)]))
    assert run.status == "reserved"  # never released: its whole reservation still counts
    assert ledger.spent() >= ledger.rule.epsilon_spent(executed)
    assert np.allclose(run.committed, ledger.curve_of(PrivacyHistory([(2.0, 0.125, 1)])))  # the checkpoint's commit
    # Resumed from the step-1 checkpoint: the new attempt is charged for its own steps, and the
    # killed attempt's reservation still covers the steps 2-4 no checkpoint recorded.
    budget = PrivacyBudget(epsilon=2.0, delta=DELTA, ledger=ledger, run_name="resumed")
    t = trainer(max_steps=8, default_root_dir=tmp_path, strategy=DPStrategy(noise_multiplier=2.0), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=tmp_path / "step1.ckpt")
    killed, resumed = sorted(ledger.runs(), key=lambda r: r.name != "killed")
    assert killed.lineage == resumed.lineage and resumed.status == "finished"
    touched = ledger.curve_of(PrivacyHistory([(2.0, 0.125, 4 + 7)]))  # steps 1-4, then steps 2-8 again
    assert ledger.spent() >= ledger.rule.epsilon_spent(touched)
    with pytest.raises(LedgerError, match="may still be running"):
        ledger.reconcile(killed.run_id, executed, steps=4)  # it wrote seconds ago
    # Reconciled from evidence of what it executed (4 steps): never below what it committed.
    ledger.reconcile(killed.run_id, executed, steps=4, min_idle=0)
    assert np.allclose(ledger.spent_curve(), touched)
    assert ledger.verify() == []


def test_steps_a_checkpoint_holds_that_the_ledger_never_charged_are_charged_on_resume(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "l.db"
    ledger = PrivacyLedger(str(path), "patients", epsilon=8.0, delta=DELTA)
    t, _, _ = fit(ledger, tmp_path / "a", max_steps=2)
    ledger.close()
    snapshot_dir = tmp_path / "snapshot"
    snapshot_dir.mkdir()
    for f in tmp_path.glob("l.db*"):
        shutil.copy(f, snapshot_dir / f.name)  # the ledger as it was after 2 steps
    t.save_checkpoint(tmp_path / "two.ckpt")
    fit(PrivacyLedger(str(path), "patients"), tmp_path / "b", max_steps=5, ckpt=tmp_path / "two.ckpt")[0].save_checkpoint(
        tmp_path / "five.ckpt")
    for f in tmp_path.glob("l.db*"):
        f.unlink()
    for f in snapshot_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)  # the ledger lost the entries of steps 3-5
    ledger = PrivacyLedger(str(path), "patients")
    with pytest.warns(UserWarning, match="were not \\(all\\) charged"):
        fit(ledger, tmp_path / "c", max_steps=8, ckpt=tmp_path / "five.ckpt")
    total = np.sum([r.committed for r in ledger.runs()], axis=0)
    assert np.allclose(total, ledger.curve_of(PrivacyHistory([(2.0, 0.125, 8)])))
    # A ledger that never saw the run charges the checkpoint's 5 steps with the fit's own.
    fresh = PrivacyLedger(str(tmp_path / "fresh.db"), "patients", epsilon=8.0, delta=DELTA)
    fit(fresh, tmp_path / "d", max_steps=8, ckpt=tmp_path / "five.ckpt")
    assert np.allclose(fresh.runs()[0].committed, ledger.curve_of(PrivacyHistory([(2.0, 0.125, 8)])))
