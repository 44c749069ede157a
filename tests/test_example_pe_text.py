"""The Private Evolution text example in --fast mode: SmolLM2-135M as the random and variation APIs,
MiniLM embeddings (both shipped by PyPI wheels, loaded offline), lines labelled by play."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.llm
def test_fast_mode_synthesizes_lines_per_play_within_the_budget(capsys) -> None:
    spec = importlib.util.spec_from_file_location("pe_text", EXAMPLES / "pe_text.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.main(["--fast"])
    out = capsys.readouterr().out
    assert f"Private Evolution epsilon spent: {r['epsilon']:.3f}" in out
    assert r["epsilon"] == pytest.approx(4.0, abs=1e-8) and r["iterations"] == 1
    assert r["report"]["epsilon"] == pytest.approx(4.0, abs=0.05) and r["report"]["steps"] == 1
    for play, lines in r["samples"].items():
        assert play in example.PLAYS and lines and all(isinstance(s, str) and len(s.split()) >= 3 for s in lines)
        # The synthetic lines are the model's, never copies of the prompt's invented examples.
        assert not any(s.split()[:4] == p.split()[:4] for s in lines for p in example.POOL)
    for key in ("cosine_initial", "cosine_final", "cosine_real", "accuracy_synthetic", "accuracy_real"):
        assert math.isfinite(r[key]) and 0 <= r[key] <= 1
    assert r["generations"] >= 2 * 3 * example.FAST["per_class"]  # the population and one variation of it
