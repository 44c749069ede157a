"""The byte-level GPT example runs end to end (its --fast mode), spends its budget and measures canaries."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("char_gpt", EXAMPLES / "char_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_char_gpt_fast_mode_trains_privately_samples_and_measures_canaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    char_gpt = _load_example()
    result = char_gpt.main(["--fast", "--epsilon", "4.0", "--canaries", "1", "--out", str(tmp_path)])
    assert result["private"] and 0.9 * 4.0 <= result["epsilon"] <= 4.0
    assert result["steps"] == 4  # --fast: 4 Poisson draws
    assert result["engine"] in ("ghost", "hooks", "functorch", "loop")
    # Even 4 noisy steps move the model off the uniform byte distribution (log 256 = 5.55 nats).
    assert result["val_loss"] < math.log(256)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert len(result["samples"]) == len(char_gpt.PROMPTS)
    assert all(s.startswith(p) and len(s) > len(p) for s, p in zip(result["samples"], char_gpt.PROMPTS))
    assert len(result["canary_exposures"]) == 1 and len(result["reference_exposures"]) == 16
    assert all(0 <= e <= result["exposure_ceiling"] for e in result["canary_exposures"] + result["reference_exposures"])
    assert list(Path(result["log_dir"]).glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert f"epsilon spent:        {result['epsilon']:.3f}" in printed and "canary exposure:" in printed


def test_canary_blocks_are_one_example_of_the_block_length() -> None:
    char_gpt = _load_example()
    data = char_gpt.ShakespeareBlocks(block_size=32)
    (block,) = data.encode_block("my number is 123456")
    assert block.shape == (33,)
    assert char_gpt.decode(block) == "my number is 123456\n" + " " * 13


@pytest.mark.slow
def test_char_gpt_protects_speakers_with_user_level_privacy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    char_gpt = _load_example()
    result = char_gpt.main(["--fast", "--privacy-unit", "speaker", "--batch-size", "8", "--epsilon", "8.0",
                            "--out", str(tmp_path)])
    assert result["private"] and result["privacy_unit"] == "speaker" and result["epsilon"] <= 8.0
    assert result["speakers"] == 19  # The Tempest's characters who speak at least one block
    assert result["steps"] == 3  # ceil(19 speakers / 8 per batch) draws
    assert result["val_loss"] < math.log(256) + 0.5
    assert "privacy unit:         a speaker" in capsys.readouterr().out
    data = char_gpt.ShakespeareBlocks(block_size=32, plays=("tempest",), by_speaker=True)
    data.setup("fit")
    ids = data.train_set.user_ids
    assert len(ids) == len(data.train_set) and "tempest:PROSPERO" in ids
    block = data.train_set[ids.index("tempest:MIRANDA")][0]
    assert len(block) == 33
