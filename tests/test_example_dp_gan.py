"""The DP-GAN example runs end to end (its --fast mode), saves its figures and reports what it spent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_dp_gan_fast_mode_spends_only_the_discriminators_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("dp_gan", EXAMPLES / "dp_gan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast", "--epsilon", "4.0", "--out", str(tmp_path)])
    assert 0.9 * 4.0 <= result["epsilon"] <= 4.0  # calibrated to the plan, never above the budget
    assert result["steps"] == 3 * 22  # one private step per Poisson batch: 3 epochs of ceil(1400 / 64)
    assert result["optimizer_steps"] == 2 * result["steps"]  # the generator's steps were not accounted
    assert result["acc_chance"] == 0.1
    assert result["acc_real"] > 0.85  # the non-private ceiling on real digits
    assert 0.0 <= result["acc_generated"] <= 1.0
    grid = mpimg.imread(result["grid_png"])
    assert grid.ndim == 3 and grid.shape[0] > 200 and grid.shape[1] > 200  # a 10 x 10 grid of digits
    assert mpimg.imread(result["utility_png"]).ndim == 3
    assert "epsilon spent:" in capsys.readouterr().out
    report = json.loads((tmp_path / "privacy_report.json").read_text())  # next to the figures
    assert report["epsilon"] == pytest.approx(result["epsilon"]) and report["steps"] == result["steps"]
