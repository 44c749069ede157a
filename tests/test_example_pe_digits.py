"""The Private Evolution digits example in --fast mode: the simulator's digits move towards the
private ones (a classifier trained on them scores better on real held-out digits), within epsilon."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_fast_mode_improves_on_the_public_simulator_within_the_budget(tmp_path: Path, capsys) -> None:
    import sys

    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("pe_digits", EXAMPLES / "pe_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--fast", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {r["data"]: r for r in result["rows"]}
    pe, public = rows["Private Evolution"], rows["public simulator only"]
    assert "Private Evolution epsilon spent: 4.000" in out and pe["epsilon"] == pytest.approx(4.0, abs=1e-8)
    (report,) = result["reports"]
    assert report["epsilon"] == pytest.approx(4.0, abs=0.05) and report["steps"] == pe["iterations"] == 5
    assert pe["mlp"] > public["mlp"] + 0.1 and pe["nearest_mean"] > public["nearest_mean"] + 0.1
    assert rows["DP-SGD on the real digits (quickstart MLP)"]["epsilon"] <= 4.0
    assert all(math.isfinite(m) for m in pe["metric_per_iteration"]) and len(pe["metric_per_iteration"]) == 5
    assert Path(pe["png"]).stat().st_size > 1000
