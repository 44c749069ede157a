"""The privacy report: privacy_report.json / .png / table at fit end, on demand, and from a
checkpoint with `python -m lightning_dp report CHECKPOINT`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.image
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from conftest import Classifier, make_dataset, pld_epsilon, trainer
from lightning_dp import DPStrategy, PrivacyAudit, PrivacyBudget
from lightning_dp.cli import main
from lightning_dp.core.accounting import PrivacyHistory, compute_epsilon
from lightning_dp.report import REPORT_JSON, REPORT_PNG, build_report

DELTA = 1e-5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path: Path, audit: bool = True, epochs: int = 3, **kw: Any) -> tuple[L.Trainer, PrivacyBudget, Any]:
    budget = PrivacyBudget(epsilon=2.0, delta=DELTA, accountant=kw.pop("accountant", "prv"))
    callbacks: list = [budget]
    data = make_dataset(n=64)
    if audit:
        canaries = make_dataset(n=20, seed=7)
        callbacks.append(PrivacyAudit(canaries, seed=0))  # after the budget: its report runs the audit first
        data = callbacks[-1].insert(data)
    kw.setdefault("default_root_dir", tmp_path)
    t = trainer(max_epochs=epochs, strategy=DPStrategy(max_grad_norm=1.0), callbacks=[*callbacks, *kw.pop("extra", [])],
                **kw)
    t.fit(Classifier(), DataLoader(data, batch_size=8, shuffle=True))
    return t, budget, callbacks[1] if audit else None


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _check_figures(report: dict, history: PrivacyHistory, accountant: str = "prv") -> None:
    """The report's figures against the ledger and independent computations."""
    eps = report["epsilon"]
    assert report["steps"] == history.steps > 0
    assert [s["mechanism"] for s in report["segments"]] == ["sampled_gaussian"] * len(history.segments)
    assert [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in report["segments"]] == history.segments
    sigma, q, _ = history.segments[-1]
    assert report["noise_multiplier"] == sigma and report["sample_rate"] == q
    assert eps == pytest.approx(compute_epsilon(history, DELTA, accountant))
    oracle = pld_epsilon(history.segments, DELTA)  # Google's PLD
    assert eps >= oracle - 0.02  # both accountants bound epsilon from above
    if accountant == "prv":
        assert eps <= oracle + 0.05  # and PRV is tight to 0.01
    assert report["epsilon_curve"][0] == [0, 0.0] and report["epsilon_curve"][-1] == [history.steps, eps]
    curve = [e for _, e in report["epsilon_curve"]]
    assert curve == sorted(curve)
    # Any (epsilon, delta)-DP run bounds a membership attack by TPR <= e^eps FPR + delta and
    # its advantage by (e^eps - 1 + 2 delta) / (e^eps + 1): the report may be tighter, never looser.
    risk = report["risk"]
    assert set(risk["tpr_at_fpr"]) == {"0.001", "0.01"}
    for fpr, tpr in risk["tpr_at_fpr"].items():
        assert float(fpr) - 1e-9 <= tpr <= min(1.0, math.exp(eps) * float(fpr) + DELTA) + 1e-6
    assert 0 <= risk["advantage"] <= (math.exp(eps) - 1 + 2 * DELTA) / (math.exp(eps) + 1) + 1e-6


@pytest.mark.slow
def test_fit_end_writes_the_report_into_the_loggers_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger = CSVLogger(tmp_path / "logs", name="run")
    t, budget, audit = _fit(tmp_path, logger=logger)
    directory = Path(t.log_dir)
    assert directory == Path(logger.log_dir) != tmp_path
    report = json.loads((directory / REPORT_JSON).read_text())
    _check_png(directory / REPORT_PNG)
    assert report["epsilon"] == pytest.approx(budget.epsilon_spent) and report["epsilon"] <= 2.0
    assert report["delta"] == DELTA and report["accountant"] == "prv" and report["epsilon_budget"] == 2.0
    assert report["accountant_error"]["kind"] == "upper bound" and report["accountant_error"]["tolerance"] == 0.01
    _check_figures(report, budget.history)
    assert audit.result is not None and report["audit"] == audit.result.to_dict()
    assert report["audit"]["delta"] == DELTA
    checks = report["safety_checks"]
    assert checks["poisson_sampling"] is True and checks["passed"] is True and checks["secure_mode"] is False
    grad = checks["per_sample_gradient_check"]
    assert grad["engine"] == t.strategy.engine.name and grad["verified"] is True and grad["examples"] > 0
    assert 0 <= grad["worst_relative_error"] < 1e-4
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["lightning"] == L.__version__
    assert report["stopped_reason"] == budget.stopped_reason
    out = capsys.readouterr().out
    assert "Privacy report" in out and "audit epsilon lower bound" in out and "passed" in out


def test_without_a_logger_the_report_goes_to_the_root_dir_and_audit_is_null(tmp_path: Path) -> None:
    t, budget, _ = _fit(tmp_path, audit=False, epochs=2, accountant="rdp")
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert report["audit"] is None and report["accountant"] == "rdp"
    assert report["accountant_error"]["kind"] == "upper bound"
    _check_figures(report, budget.history, "rdp")
    _check_png(tmp_path / REPORT_PNG)


@pytest.mark.slow
def test_report_false_writes_nothing_and_on_demand_writes_where_asked(tmp_path: Path) -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=DELTA, report=False)
    t = trainer(max_epochs=1, strategy=DPStrategy(max_grad_norm=1.0), callbacks=[budget], default_root_dir=tmp_path)
    t.fit(Classifier(), DataLoader(make_dataset(n=64), batch_size=8, shuffle=True))
    assert not (tmp_path / REPORT_JSON).exists()
    report = budget.report(t, show=False)  # on demand, into the Trainer's directory
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == report
    elsewhere = budget.report(directory=tmp_path / "elsewhere", show=False)  # no Trainer given
    assert elsewhere["safety_checks"] == report["safety_checks"]  # the callback still knows its strategy
    _check_png(tmp_path / "elsewhere" / REPORT_PNG)
    with pytest.raises(ValueError, match="report must be True or False"):
        PrivacyBudget(epsilon=1.0, delta=DELTA, report="yes")  # type: ignore[arg-type]


def test_the_report_is_strict_json_even_for_an_unbounded_epsilon() -> None:
    budget = PrivacyBudget(epsilon=1.0, delta=DELTA, accountant="rdp")
    budget.history.record(0.0, 0.1, 5)  # no noise: epsilon is infinite
    report = build_report(budget.record())
    assert report["epsilon"] == "inf"
    json.dumps(report, allow_nan=False)


# ---------------------------------------------------------------------- python -m lightning_dp report
def _checkpoint(tmp_path: Path) -> tuple[Path, PrivacyBudget, Any]:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    t, budget, audit = _fit(tmp_path, epochs=2, extra=[ckpt], enable_checkpointing=True)
    return tmp_path / "ckpt" / "last.ckpt", budget, audit


@pytest.mark.slow
def test_report_command_prints_the_checkpoints_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, budget, _ = _checkpoint(tmp_path)
    fit_report = json.loads((tmp_path / REPORT_JSON).read_text())
    capsys.readouterr()
    assert main(["report", str(path), "--out", str(tmp_path / "from_ckpt")]) == 0
    out = capsys.readouterr().out
    assert float(out.strip().splitlines()[-1]) == pytest.approx(budget.epsilon_spent, rel=1e-5)
    assert "Privacy report" in out and "safety checks" in out
    report = json.loads((tmp_path / "from_ckpt" / REPORT_JSON).read_text())
    _check_png(tmp_path / "from_ckpt" / REPORT_PNG)
    _check_figures(report, budget.history)
    # The checkpoint was written before the audit ran: the same report otherwise.
    assert report["audit"] is None and fit_report["audit"] is not None
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "segments", "risk",
                "safety_checks"):
        assert report[key] == fit_report[key], key


@pytest.mark.slow
def test_report_command_runs_as_a_module(tmp_path: Path) -> None:
    path, budget, _ = _checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lightning_dp", "report", str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(budget.epsilon_spent, rel=1e-5)


def test_report_command_refuses_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "nope.ckpt")])
    assert exit_.value.code == 2 and "no checkpoint file at" in capsys.readouterr().err


def test_report_command_refuses_a_file_that_is_no_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "notes.ckpt")])
    assert exit_.value.code == 2 and "is not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_report_command_refuses_a_checkpoint_without_a_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = trainer(max_epochs=1, strategy=DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0), default_root_dir=tmp_path)
    t.fit(Classifier(), DataLoader(make_dataset(n=32), batch_size=8, shuffle=True))
    t.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "plain.ckpt")])
    assert exit_.value.code == 2 and "holds no PrivacyBudget state" in capsys.readouterr().err


def test_a_risk_budget_without_epsilon_is_reported(tmp_path: Path) -> None:
    budget = PrivacyBudget(delta=DELTA, max_tpr_at_fpr={0.05: 0.5}, accountant="rdp")
    budget.history.record(2.0, 0.05, 50)
    report = build_report(budget.record())
    assert report["epsilon_budget"] is None and report["max_tpr_at_fpr"] == {"0.05": 0.5}
    assert set(report["risk"]["tpr_at_fpr"]) == {"0.001", "0.01", "0.05"}
    eps = report["epsilon"]
    assert report["risk"]["tpr_at_fpr"]["0.05"] <= min(1.0, math.exp(eps) * 0.05 + DELTA) + 1e-6
    from lightning_dp.report import print_report, write_report

    write_report(report, tmp_path, budget.history)
    _check_png(tmp_path / REPORT_PNG)
    print_report(report)
