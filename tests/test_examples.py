"""The quickstart example runs end to end (its --fast mode) and reports what it spent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_fast_mode_spends_its_budget_and_logs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("quickstart_digits", EXAMPLES / "quickstart_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast", "--epsilon", "2.0", "--out", str(tmp_path)])
    assert 0.9 * 2.0 <= result["epsilon"] <= 2.0
    assert result["steps"] == 3 * 22  # 3 epochs of ceil(1400 / 64) Poisson draws
    assert result["val_acc"] > 0.5  # far above chance (0.1) even under noise
    assert list(Path(result["log_dir"]).glob("events.out.tfevents.*"))
