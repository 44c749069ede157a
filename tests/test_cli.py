"""python -m lightning_dp epsilon / noise: planning figures, last line alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import pld_epsilon
from lightning_dp.cli import main
from lightning_dp.core.accounting import compute_epsilon


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_dp", *args], capture_output=True, text=True, timeout=120)


def test_epsilon_command_matches_the_design_reference_and_the_oracle() -> None:
    out = cli("epsilon", "--sample-rate", str(256 / 60000), "--noise-multiplier", "1.0", "--steps", "2344",
              "--delta", "1e-5")
    assert out.returncode == 0, out.stderr
    value = float(out.stdout.strip().splitlines()[-1])
    assert value == pytest.approx(1.110, abs=0.005)
    assert value >= pld_epsilon([(1.0, 256 / 60000, 2344)], 1e-5) - 0.01


def test_noise_command_inverts_epsilon(capsys: pytest.CaptureFixture) -> None:
    assert main(["noise", "--sample-rate", "0.01", "--epsilon", "2.0", "--steps", "500", "--delta", "1e-5",
                 "--accountant", "rdp"]) == 0
    sigma = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.98 * 2.0 <= compute_epsilon([(sigma, 0.01, 500)], 1e-5, "rdp") <= 2.0


@pytest.mark.parametrize(
    "args",
    [["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
     ["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
     ["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"],
     ["noise", "--sample-rate", "0.1", "--epsilon", "0", "--steps", "10", "--delta", "1e-5"],
     ["noise", "--sample-rate", "0.1", "--epsilon", "1", "--steps", "10", "--delta", "2"]],
)
def test_bad_arguments_exit_with_a_message(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "error" in capsys.readouterr().err


def test_planning_commands_never_import_torch_and_give_the_full_imports_figure() -> None:
    # -X importtime lists every module the command imports, on standard error.
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightning_dp", "epsilon", "--sample-rate", "0.01",
                          "--steps", "500", "--noise-multiplier", "1.1", "--delta", "1e-5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "opacus.accountants.prv" in imported
    assert not {"torch", "lightning", "lightning_dp.lightning.strategy"} & imported
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(compute_epsilon([(1.1, 0.01, 500)], 1e-5),
                                                                      rel=1e-5)


def test_dataset_size_batch_size_and_epochs_describe_the_run_as_dpstrategy_trains_it(capsys) -> None:
    assert main(["epsilon", "--dataset-size", "1000", "--batch-size", "64", "--epochs", "3", "--noise-multiplier", "1.0",
                 "--delta", "1e-5", "--accountant", "rdp"]) == 0
    by_size = float(capsys.readouterr().out.strip().splitlines()[-1])
    # 64 / 1000 per draw, ceil(1000 / 64) = 16 draws per epoch: DPStrategy's loader.
    assert by_size == pytest.approx(compute_epsilon([(1.0, 64 / 1000, 48)], 1e-5, "rdp"), rel=1e-6)
    with pytest.raises(SystemExit):
        main(["epsilon", "--dataset-size", "1000", "--batch-size", "64", "--noise-multiplier", "1", "--delta", "1e-5"])
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["epsilon", "--sample-rate", "0.1", "--steps", "5", "--epochs", "2", "--noise-multiplier", "1",
              "--delta", "1e-5"])
    assert "one of the two" in capsys.readouterr().err


def test_every_option_has_help_and_its_default() -> None:
    import argparse

    from lightning_dp.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"epsilon", "noise", "report", "ledger"}
    (actions,) = [a for a in commands.choices["ledger"]._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(actions.choices) == {"show", "verify", "set-total"}
    for name, sub in [*commands.choices.items(), *actions.choices.items()]:
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{name}: {action.option_strings} hides its default"


def test_a_budget_no_noise_can_meet_is_one_line() -> None:
    out = cli("noise", "--sample-rate", "1", "--steps", "10", "--epsilon", "1e-4", "--delta", "1e-10",
              "--accountant", "rdp")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "No noise multiplier" in out.stderr


def lightning_cli(tmp_path, *runs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """A LightningCLI script that never imports lightning_dp itself, as users write them: one
    process per argument list, all started together (their imports overlap)."""
    from pathlib import Path

    script = tmp_path / "main.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from lightning.pytorch.cli import LightningCLI\n"
        "from conftest import Classifier, Data\n"
        "LightningCLI(Classifier, Data)\n"
    )
    procs = []
    for i, args in enumerate(runs):
        common = ["fit", "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                  "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / str(i)}"]
        procs.append(subprocess.Popen([sys.executable, str(script), *common, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_lightning_cli_takes_the_class_paths_without_importing_lightning_dp(tmp_path) -> None:
    budget = ("--trainer.strategy.class_path=lightning_dp.DPStrategy", "--trainer.callbacks+=lightning_dp.PrivacyBudget",
              "--trainer.callbacks.epsilon=3")
    out, missing = lightning_cli(tmp_path, (*budget, "--trainer.callbacks.delta=1e-5"), budget)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per-sample gradients by the 'ghost' engine" in out.stderr + out.stdout
    assert missing.returncode != 0 and "PrivacyBudget needs delta" in missing.stderr


def test_main_called_from_python_leaves_the_real_opacus_importable() -> None:
    # The planning commands load Opacus's accountants behind a placeholder `opacus` package (no
    # torch); a process that goes on afterwards must still import the real one.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['-m', 'epsilon', '--sample-rate', '0.01', '--steps', '100', '--noise-multiplier', '1.0',"
        " '--delta', '1e-5']\n"
        "sys.orig_argv = [sys.executable, '-m', 'lightning_dp', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('lightning_dp', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
        "assert 'torch' not in sys.modules\n"
        "from opacus import PrivacyEngine\n"
        "from opacus.optimizers import DPOptimizer\n"
        "assert hasattr(DPOptimizer, 'step'), DPOptimizer\n"
        "from lightning_dp.core.accounting import compute_epsilon\n"
        "print(compute_epsilon([(1.0, 0.01, 100)], 1e-5))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) == pytest.approx(compute_epsilon([(1.0, 0.01, 100)], 1e-5))


def test_another_tool_run_with_python_m_gets_the_strategies_registered(tmp_path) -> None:
    # `python -m mytool`, whose package imports lightning_dp, has sys.argv[0] == "-m" too.
    (tmp_path / "mytool").mkdir()
    (tmp_path / "mytool" / "__init__.py").write_text("import lightning_dp\n")
    (tmp_path / "mytool" / "__main__.py").write_text(
        "import lightning as L\n"
        "t = L.Trainer(strategy='dp', accelerator='cpu', logger=False, enable_checkpointing=False)\n"
        "print(type(t.strategy).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-m", "mytool"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "DPStrategy"
