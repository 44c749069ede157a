"""The PMixED example end to end in --fast mode: SmolLM2-135M as the public model, four LoRA
members on the plays stacked in a LoRAEnsemble, one budget over every token scored and sampled."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.llm
def test_fast_mode_answers_within_the_budget_and_prints_the_epsilon_spent(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("pmixed_generate", EXAMPLES / "pmixed_generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # DP-SGD LoRA on SmolLM2 is exercised by the fine-tuning example's test; here only PMixED's path.
    r = example.main(["--fast", "--no-dpsgd", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"epsilon spent:        {r['epsilon']:.3f} over {r['queries']} queries" in out
    # The whole budget is the scored tokens plus the sample, and it is spent exactly, never exceeded.
    assert r["queries"] == r["scored"] + example.FAST["sample_tokens"]
    assert r["epsilon"] == pytest.approx(8.0, abs=1e-9)
    report = r["report"]
    assert report["epsilon"] == pytest.approx(r["epsilon"], abs=1e-9) and report["steps"] == r["queries"]
    assert "partition" in report["privacy_unit"]
    assert 0 < r["beta"] and r["alpha"] == 3 and isinstance(r["sample"], str) and len(r["sample"]) > 0
    for key in ("ppl_public", "ppl_pmixed", "ppl_nonprivate"):
        assert math.isfinite(r[key]) and r[key] > 1
    assert r["ppl_nonprivate"] < r["ppl_public"]  # the members' training data is informative
