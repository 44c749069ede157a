"""A tampered or inconsistent checkpoint ledger is refused, naming the field; a checkpoint
written by lightning-dp 0.1 (no digests) still resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.core.accounting import compute_epsilon
from lightning_dp.core.integrity import KEY_VARIABLE

def report_command(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``python -m lightning_dp report PATH`` in this process (tests/test_report.py runs it as a
    module once): its exit code, standard output and error."""
    from lightning_dp.cli import main

    capsys.readouterr()
    try:
        code = main(["report", str(path)])
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_v0_1.ckpt"


def write_checkpoint(path: Path) -> None:
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[PrivacyBudget(epsilon=8.0, delta=1e-5)])
    t.fit(Classifier(), loader(make_dataset()))
    t.save_checkpoint(path)


def budget_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("PrivacyBudget")]
    return checkpoint["callbacks"][key]


def resume(path: Path, budget: PrivacyBudget | None = None) -> PrivacyBudget:
    budget = budget or PrivacyBudget(epsilon=8.0, delta=1e-5)
    t = trainer(max_steps=5, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset()), ckpt_path=path)
    return budget


def edited(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = tmp_path / "run.ckpt"
    if not path.exists():
        write_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    edit(budget_state(checkpoint))
    out = tmp_path / "edited.ckpt"
    torch.save(checkpoint, out)
    return out


def larger_sigma(state: dict[str, Any]) -> None:
    state["history"]["segments"][0][0] = 10.0


def smaller_rate(state: dict[str, Any]) -> None:
    state["history"]["segments"][0][1] = 0.001


def fewer_steps(state: dict[str, Any]) -> None:
    state["history"]["segments"][0][2] = 1


@pytest.mark.parametrize("edit", [larger_sigma, smaller_rate])
def test_an_edited_ledger_is_refused_naming_the_field(tmp_path: Path, edit) -> None:
    with pytest.raises(ValueError, match=r"field\(s\) 'history' do not match"):
        resume(edited(tmp_path, edit))


def test_a_ledger_with_steps_removed_is_refused(tmp_path: Path) -> None:
    # Fewer steps than the checkpoint trained is caught before the digest, by the step count.
    with pytest.raises(ValueError, match="were not accounted|'history'"):
        resume(edited(tmp_path, fewer_steps))


def test_edited_targets_and_a_stripped_digest_are_refused(tmp_path: Path) -> None:
    def raise_epsilon(state: dict[str, Any]) -> None:
        state["epsilon"] = 100.0

    with pytest.raises(ValueError, match="'epsilon'"):
        resume(edited(tmp_path, raise_epsilon))

    def drop_digest(state: dict[str, Any]) -> None:
        del state["digests"]["history"]
        larger_sigma(state)

    with pytest.raises(ValueError, match="'history'"):
        resume(edited(tmp_path, drop_digest))


def test_another_runs_ledger_is_refused(tmp_path: Path) -> None:
    def other_run(state: dict[str, Any]) -> None:
        state["run_id"] = "0" * 32

    with pytest.raises(ValueError, match="'history'"):
        resume(edited(tmp_path, other_run))


def test_an_unmodified_checkpoint_resumes_and_keeps_its_run_identity(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    write_checkpoint(path)
    run_id = budget_state(torch.load(path, weights_only=False))["run_id"]
    budget = resume(path)
    assert budget.steps == 5 and budget.run_id == run_id


def test_with_a_key_unsigned_and_foreign_ledgers_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unsigned = tmp_path / "unsigned.ckpt"
    write_checkpoint(unsigned)
    monkeypatch.setenv(KEY_VARIABLE, "team-secret")
    with pytest.raises(ValueError, match="'signed'"):
        resume(unsigned)
    signed = tmp_path / "signed.ckpt"
    write_checkpoint(signed)
    assert resume(signed).steps == 5
    monkeypatch.setenv(KEY_VARIABLE, "another-secret")
    with pytest.raises(ValueError, match="'history'"):
        resume(signed)
    with pytest.raises(ValueError, match="'digests'"):  # a 0.1 checkpoint has no signature
        resume(LEGACY, PrivacyBudget(epsilon=8.0, delta=1e-5, allow_unverified_ledger=True))


def test_a_checkpoint_written_by_lightning_dp_0_1_resumes_when_allowed_and_is_marked_unverified(tmp_path) -> None:
    legacy = budget_state(torch.load(LEGACY, weights_only=False))
    segments = [tuple(s) for s in legacy["history"]["segments"]]
    assert segments == [(0.96484375, 0.125, 5)]
    # By default refused: a 0.1 ledger looks exactly like one whose digests were stripped.
    with pytest.raises(ValueError, match="allow_unverified_ledger=True"):
        trainer(max_steps=8, strategy=DPStrategy(), callbacks=[PrivacyBudget(epsilon=3.0, delta=1e-5)]).fit(
            Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=LEGACY)
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5, allow_unverified_ledger=True)
    t = trainer(max_steps=8, strategy=DPStrategy(), callbacks=[budget], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="before ledgers carried digests"):
        t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=LEGACY)
    assert budget.steps == 8 and budget.history.segments[0] == segments[0]
    assert compute_epsilon(segments, 1e-5) < budget.epsilon_spent <= 3.0
    assert budget.ledger_verified is False and budget.report(t, show=False)["ledger_verified"] is False
    # ... and stays marked when the resumed run is saved and resumed again.
    t.save_checkpoint(tmp_path / "again.ckpt")
    again = resume(tmp_path / "again.ckpt", PrivacyBudget(epsilon=8.0, delta=1e-5))
    assert again.ledger_verified is False


def test_a_ledger_copied_whole_from_another_runs_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cheap, costly = tmp_path / "cheap.ckpt", tmp_path / "costly.ckpt"
    write_checkpoint(cheap)
    write_checkpoint(costly)
    spliced = torch.load(costly, weights_only=False)
    spliced["callbacks"] = torch.load(cheap, weights_only=False)["callbacks"]  # identity, digests and all
    torch.save(spliced, tmp_path / "spliced.ckpt")
    with pytest.raises(ValueError, match="'binding'"):
        resume(tmp_path / "spliced.ckpt")
    code, _, err = report_command(tmp_path / "spliced.ckpt", capsys)
    assert code != 0 and "'binding'" in err


def test_a_stripped_digest_is_refused_like_a_0_1_ledger(tmp_path: Path) -> None:
    def strip(state: dict[str, Any]) -> None:
        larger_sigma(state)
        for key in ("digests", "version", "run_id", "signed", "binding"):
            state.pop(key, None)

    with pytest.raises(ValueError, match="allow_unverified_ledger"):
        resume(edited(tmp_path, strip))


def test_the_report_command_refuses_a_tampered_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = edited(tmp_path, larger_sigma)
    code, _, err = report_command(path, capsys)
    assert code != 0 and "'history'" in err


class AdapterOnly(Classifier):
    """The usual LoRA/adapter pattern: a frozen base, left out of checkpoints and of strict loading."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.0.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"]["net.0.weight"] = self.net[0].weight.detach().clone()  # a hook that adds back


def test_a_module_that_trims_its_checkpoint_resumes_and_its_report_verifies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Lightning calls the callbacks' on_save_checkpoint before the module's: the binding must be
    # over the weights the file holds, and resume must check the file before the module's hook edits it.
    path = tmp_path / "adapter.ckpt"
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[PrivacyBudget(epsilon=8.0, delta=1e-5)])
    t.fit(AdapterOnly(), loader(make_dataset()))
    t.save_checkpoint(path)
    assert not any(k.startswith("net.0.") for k in torch.load(path, weights_only=False)["state_dict"])
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    t = trainer(max_steps=5, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget])
    t.fit(AdapterOnly(), loader(make_dataset()), ckpt_path=path)
    assert budget.ledger_verified and budget.history.steps == 5
    code, _, err = report_command(path, capsys)
    assert code == 0, err
    # The binding still covers what the file holds: an edited adapter weight is refused.
    tampered = torch.load(path, weights_only=False)
    tampered["state_dict"]["net.2.weight"] = tampered["state_dict"]["net.2.weight"] * 0
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match="'binding'"):
        t = trainer(max_steps=5, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[PrivacyBudget(epsilon=8.0, delta=1e-5)])
        t.fit(AdapterOnly(), loader(make_dataset()), ckpt_path=tmp_path / "tampered.ckpt")


PRE_CORE = Path(__file__).resolve().parent / "fixtures" / "pre_core_870e4b4.ckpt"


def test_a_checkpoint_written_before_the_privacy_core_resumes_verified_and_continues(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    t = trainer(max_steps=7, default_root_dir=tmp_path, callbacks=[budget],
                strategy=DPStrategy(max_grad_norm=1.0, noise_multiplier=1.1))
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=PRE_CORE)
    assert budget.ledger_verified is True
    assert budget.history.segments == [(1.1, 0.125, 7)]  # the 5 steps it held, then 2 more, merged
    assert budget.epsilon_spent == pytest.approx(compute_epsilon([(1.1, 0.125, 7)], 1e-5))
    code, out, err = report_command(PRE_CORE, capsys)
    assert code == 0, err
    assert "2.296" in out  # epsilon after its 5 steps
