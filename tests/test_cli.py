"""python -m lightning_dp epsilon / noise: planning figures, last line alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import pld_epsilon
from lightning_dp.__main__ import main
from lightning_dp.accounting import compute_epsilon


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
