"""The benchmark script stays runnable (its figures live in benchmarks/RESULTS.md, not here).

In this process (the script runs each configuration in a subprocess of its own only so that
peak memory is measured cleanly): a subprocess per mode cost ~8 s of imports each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench as module
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.parametrize("mode", ["lightning", "dp-hooks", "opacus", "opacus-ghost", "dp-ghost+budget"])
def test_benchmark_measures_one_configuration(bench: ModuleType, mode: str) -> None:
    result = bench.run_one("digits-mlp", mode, steps=2, warmup=1, device=torch.device("cpu"))
    assert result["step_s"] > 0 and result["peak_mb"] >= 0
    if "+" not in mode:  # one more, profiled step: its tensors (the batch holds 30-ish digits)
        assert result["tensor_mb"] > 0 and result["tensor_batch"] > 0


def test_the_profile_of_a_step_has_every_phase(bench: ModuleType) -> None:
    bench.MODELS["gpt-tiny"] = {"kind": "gpt", "d": 16, "T": 8, "layers": 1, "heads": 2, "vocab": 32, "batch": 8}
    try:
        ph = bench.phases("gpt-tiny", torch.device("cpu"), reps=2)
    finally:
        del bench.MODELS["gpt-tiny"]
    assert set(ph) == {"forward", "backward", "ghost pass", "norms", "clipped sum"} and all(v > 0 for v in ph.values())


@pytest.mark.slow
def test_the_script_runs_as_a_command() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300, check=True)
    assert "benchmarks/RESULTS.md" in out.stdout
