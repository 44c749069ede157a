"""The benchmark script stays runnable (its figures live in benchmarks/RESULTS.md, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lightning", "dp-hooks", "opacus"])
def test_benchmark_measures_one_configuration(mode: str) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", "digits-mlp", mode, "--device", "cpu", "--steps", "2"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["step_s"] > 0 and result["peak_mb"] >= 0
