"""CanaryExposure: secrets inserted into the training text, and how exposed training leaves them.

A non-private run memorises a repeated canary (exposure near its ceiling, far above secrets
never inserted); a DP run at a small epsilon leaves it among the never-inserted references.
Ranks are checked against a brute-force ranking of every candidate computed here.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from lightning_dp import CanaryExposure, DPStrategy, PrivacyBudget
from lightning_dp.lightning.canary import next_token_log_likelihood

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare" / "tempest.txt"
BLOCK = 24  # bytes a model reads per example; an example is BLOCK + 1 bytes
N_BLOCKS = 1200  # of the play's blocks: enough text, fast enough
SECRET_LENGTH = 3  # |R| = 1000 candidates: every one is scored, ranks are exact


def encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.long)


def encode_block(text: str) -> tuple[Tensor]:
    ids = encode(text + "\n")
    return (F.pad(ids, (0, BLOCK + 1 - len(ids)), value=ord(" ")),)


def text_blocks() -> TensorDataset:
    ids = encode(CORPUS.read_text(encoding="utf-8"))
    return TensorDataset(ids[: N_BLOCKS * (BLOCK + 1)].view(N_BLOCKS, BLOCK + 1))


class WindowLM(L.LightningModule):
    """A byte-level LM predicting each next byte from the last ``context`` bytes; ``forward(ids)``
    returns next-token logits ``(batch, time, 256)``."""

    def __init__(self, context: int = 4, dim: int = 16, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.context, self.lr = context, lr
        self.emb = nn.Embedding(256, dim)
        self.hidden = nn.Linear(context * dim, hidden)
        self.out = nn.Linear(hidden, 256)

    def forward(self, ids: Tensor) -> Tensor:
        x = F.pad(self.emb(ids), (0, 0, self.context - 1, 0))  # (B, T + context - 1, dim)
        windows = x.unfold(1, self.context, 1).flatten(2)  # (B, T, dim * context)
        return self.out(torch.tanh(self.hidden(windows)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        block = batch[0]
        return F.cross_entropy(self(block[:, :-1]).reshape(-1, 256), block[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_canary(**kw: Any) -> CanaryExposure:
    kw.setdefault("tokenize", encode)
    kw.setdefault("secret_length", SECRET_LENGTH)
    kw.setdefault("num_canaries", 2)
    kw.setdefault("repetitions", 16)
    kw.setdefault("num_references", 32)
    kw.setdefault("num_candidates", 1000)
    return CanaryExposure(**kw)


def fit(canary: CanaryExposure, private: bool, epochs: int, tmp_path: Path, **trainer_kw: Any) -> tuple[L.Trainer, WindowLM]:
    L.seed_everything(0, verbose=False)
    train_set = canary.insert(text_blocks(), encode=encode_block)
    callbacks: list[L.Callback] = [canary]
    if private:
        callbacks.append(PrivacyBudget(epsilon=1.0, delta=1e-4))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        strategy=DPStrategy(max_grad_norm=1.0) if private else "auto",
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    )
    model = WindowLM()
    trainer.fit(model, DataLoader(train_set, batch_size=64, shuffle=True))
    return trainer, model


def brute_force_exposures(model: WindowLM, canary: CanaryExposure, texts: list[str]) -> list[float]:
    """Exposures from every candidate's log-likelihood, computed position by position here."""
    everything = [canary.format.format(secret=str(i).zfill(SECRET_LENGTH)) for i in range(10**SECRET_LENGTH)]
    exposures = []
    for text in texts:
        # Candidates: every secret but the *other* inserted canaries.
        candidates = [c for c in everything if c == text or c not in canary.canaries]
        exposures.append(_brute_force_exposure(model, candidates, text))
    return exposures


def _brute_force_exposure(model: WindowLM, candidates: list[str], text: str) -> float:
    ids = torch.stack([encode(t) for t in candidates])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
    rows = torch.arange(len(candidates))
    scores = sum(logp[rows, t, ids[:, t + 1]] for t in range(ids.shape[1] - 1))
    rank = int((scores >= scores[candidates.index(text)]).sum())  # 1 = the most likely
    return math.log2(len(candidates)) - math.log2(rank)


@pytest.fixture(scope="module")
def non_private(tmp_path_factory: pytest.TempPathFactory) -> tuple[L.Trainer, WindowLM, CanaryExposure, Path]:
    tmp = tmp_path_factory.mktemp("non_private")
    canary = make_canary(every_n_epochs=1)
    trainer, model = fit(canary, private=False, epochs=2, tmp_path=tmp)
    return trainer, model, canary, Path(trainer.logger.log_dir)


@pytest.mark.slow
def test_without_privacy_a_repeated_canary_is_memorised(non_private: Any) -> None:
    trainer, model, canary, _ = non_private
    assert len(canary.exposures) == 2 and len(canary.reference_exposures) == 32
    # Far above every secret the model never saw, and near the ceiling log2(1000).
    assert min(canary.exposures) > max(canary.reference_exposures)
    assert min(canary.exposures) > 0.75 * canary.ceiling
    assert canary.ceiling == pytest.approx(math.log2(1000))
    assert float(trainer.callback_metrics["dp/canary_exposure"]) == pytest.approx(sum(canary.exposures) / 2)


@pytest.mark.slow
def test_exact_ranks_match_a_brute_force_ranking(non_private: Any) -> None:
    _, model, canary, _ = non_private
    model.eval()
    measured = canary.exposures + canary.reference_exposures
    expected = brute_force_exposures(model, canary, canary.canaries + canary.references)
    assert measured == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_sampled_estimate_agrees_with_exact_ranks_up_to_its_ceiling(non_private: Any) -> None:
    trainer, model, exact, _ = non_private
    sampled = make_canary(num_candidates=255)  # same seed: the same secrets, ranked against 255 draws
    assert sampled.canaries == exact.canaries and not sampled.exact
    assert sampled.ceiling == 8.0
    sampled.measure(trainer, model)
    for estimate, truth in zip(sampled.exposures, exact.exposures):
        assert estimate <= sampled.ceiling
        # Near the ceiling the estimate rests on a handful of draws: it may fall short, not exceed.
        assert min(truth, sampled.ceiling) - 2.0 <= estimate
    errors = [abs(e - t) for e, t in zip(sampled.reference_exposures, exact.reference_exposures)]
    assert sum(errors) / len(errors) < 0.5


@pytest.mark.slow
def test_exposure_is_logged_every_n_epochs_and_at_the_end(non_private: Any) -> None:
    trainer, _, canary, log_dir = non_private
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dp/canary_exposure")]
    steps = [int(r["step"]) for r in rows]
    per_epoch = trainer.global_step // 2
    assert steps == [per_epoch, 2 * per_epoch]  # each epoch's end, the last one measured once
    last = rows[-1]
    assert float(last["dp/canary_exposure"]) == pytest.approx(sum(canary.exposures) / 2, rel=1e-5)
    assert float(last["dp/canary_exposure/1"]) == pytest.approx(canary.exposures[1], rel=1e-5)
    refs = canary.reference_exposures
    assert float(last["dp/canary_exposure/reference"]) == pytest.approx(sum(refs) / len(refs), rel=1e-5)


@pytest.mark.slow
def test_under_a_small_epsilon_the_canary_stays_among_random_candidates(tmp_path: Path) -> None:
    canary = make_canary()
    trainer, _ = fit(canary, private=True, epochs=2, tmp_path=tmp_path)
    budget = next(c for c in trainer.callbacks if isinstance(c, PrivacyBudget))
    assert 0.9 <= budget.epsilon_spent <= 1.0
    references = canary.reference_exposures
    # Never-inserted secrets: a random candidate's exposure averages 1/ln 2 bits.
    assert sum(references) / len(references) == pytest.approx(1 / math.log(2), abs=0.8)
    assert max(canary.exposures) <= max(references)
    assert sum(canary.exposures) / len(canary.exposures) < 0.5 * canary.ceiling


def test_state_dict_holds_the_secrets_so_a_resumed_run_measures_the_same_canaries() -> None:
    first = make_canary(seed=1)
    first.exposures, first.reference_exposures = [3.0, 4.0], [1.0] * 32
    resumed = make_canary(seed=2)  # as a resumed run would build it before the checkpoint loads
    train_set = resumed.insert(text_blocks(), encode=encode_block)
    assert resumed.canaries != first.canaries
    resumed.load_state_dict(first.state_dict())
    assert resumed.canaries == first.canaries and resumed.references == first.references
    assert resumed.exposures == [3.0, 4.0]
    # The inserted examples follow the restored secrets.
    inserted = {tuple(train_set[i][0].tolist()) for i in resumed.canary_indices}
    assert inserted == {tuple(encode_block(t)[0].tolist()) for t in first.canaries}
    assert len(resumed.canary_indices) == 2 * 16


def test_insert_appends_repetitions_of_each_canary() -> None:
    canary = make_canary(num_canaries=3, repetitions=5)
    base = text_blocks()
    train_set = canary.insert(base, encode=encode_block)
    assert len(train_set) == N_BLOCKS + 15
    assert torch.equal(train_set[0][0], base[0][0]) and torch.equal(train_set[-1][0], encode_block(canary.canaries[2])[0])
    counts = [sum(torch.equal(train_set[i][0], encode_block(t)[0]) for i in canary.canary_indices) for t in canary.canaries]
    assert counts == [5, 5, 5]
    assert all(t.startswith("my number is ") and t[-3:].isdigit() for t in canary.canaries + canary.references)
    assert len(set(canary.canaries + canary.references)) == 3 + 32
    with pytest.raises(IndexError):
        train_set[len(train_set)]


def test_default_log_likelihood_masks_padding_and_ignores_the_first_token() -> None:
    model = WindowLM().eval()
    ll = next_token_log_likelihood(encode)
    with torch.no_grad():
        together = ll(model, ["my number is 1", "ab"])
        alone = torch.cat([ll(model, ["my number is 1"]), ll(model, ["ab"])])
        logp = torch.log_softmax(model(encode("ab")[None, :1]), -1)[0, 0, ord("b")]
    assert torch.allclose(together, alone, atol=1e-5)
    assert together[1] == pytest.approx(float(logp), abs=1e-5)


# ---------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenize": None}, "exactly one of tokenize"),
        ({"log_likelihood": lambda m, t: torch.zeros(len(t))}, "exactly one of tokenize"),
        ({"format": "my number is"}, "exactly one '{secret}' field"),
        ({"format": "{secret} and {secret}"}, "exactly one '{secret}' field"),
        ({"format": "{name}: {secret}"}, "exactly one '{secret}' field"),
        ({"format": "{secret} is my number"}, "must start with some text before '{secret}'"),
        ({"alphabet": "1"}, "at least 2 distinct"),
        ({"alphabet": "112"}, "at least 2 distinct"),
        ({"secret_length": 0}, "secret_length must be an int >= 1"),
        ({"num_canaries": 0}, "num_canaries must be an int >= 1"),
        ({"repetitions": 1.5}, "repetitions must be an int >= 1"),
        ({"num_references": -1}, "num_references must be an int >= 0"),
        ({"num_candidates": True}, "num_candidates must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"every_n_epochs": 0}, "every_n_epochs must be None or an int >= 1"),
        ({"seed": "0"}, "seed must be an int"),
        ({"secret_length": 1, "num_canaries": 2, "num_references": 9}, "do not fit in the 10 candidates"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        make_canary(**kwargs)


def test_non_callable_functions_are_refused() -> None:
    with pytest.raises(TypeError, match="log_likelihood must be callable"):
        CanaryExposure(log_likelihood="loglik")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokenize must be a function"):
        CanaryExposure(tokenize="bytes")  # type: ignore[arg-type]


def test_insert_refuses_datasets_it_cannot_extend() -> None:
    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from range(3)

    canary = make_canary()
    with pytest.raises(TypeError, match="map-style dataset"):
        canary.insert(Stream(), encode=encode_block)
    with pytest.raises(TypeError, match="encode must be a function"):
        canary.insert(text_blocks(), encode="bytes")  # type: ignore[arg-type]


def _tiny_fit(canary: CanaryExposure, train_set: Any, tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, callbacks=[canary], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(WindowLM(), DataLoader(train_set, batch_size=64, shuffle=True))


def test_training_without_inserting_the_canaries_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=_escape("no canaries were inserted")):
        _tiny_fit(make_canary(), text_blocks(), tmp_path)


def test_training_on_anything_but_the_inserted_dataset_is_refused(tmp_path: Path) -> None:
    canary = make_canary()
    with_canaries = canary.insert(text_blocks(), encode=encode_block)
    without = Subset(with_canaries, range(N_BLOCKS))  # drops the canaries
    with pytest.raises(ValueError, match="does not hold the dataset canary.insert"):
        _tiny_fit(canary, without, tmp_path)


def test_a_log_likelihood_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    canary = make_canary(tokenize=None, log_likelihood=lambda module, texts: torch.zeros(len(texts), 2))
    train_set = canary.insert(text_blocks(), encode=encode_block)
    with pytest.raises(ValueError, match=_escape("must return a tensor of shape (")):
        _tiny_fit(canary, train_set, tmp_path)


def test_a_module_without_next_token_logits_is_refused_by_the_default_log_likelihood() -> None:
    class Scalar(L.LightningModule):
        def forward(self, ids: Tensor) -> Tensor:
            return ids.float().sum(1)

    with pytest.raises(ValueError, match=_escape("must return next-token logits of shape (batch, time, vocab)")):
        next_token_log_likelihood(encode)(Scalar(), ["abc"])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        next_token_log_likelihood(encode)(WindowLM(), ["a"])


def test_a_checkpoint_of_other_canaries_is_refused() -> None:
    state = make_canary().state_dict()
    with pytest.raises(ValueError, match="format, alphabet, secret_length"):
        make_canary(format="my pin is {secret}").load_state_dict(state)
    with pytest.raises(ValueError, match="the checkpoint has 2 canaries"):
        make_canary(num_canaries=3).load_state_dict(state)


def _escape(message: str) -> str:
    import re

    return re.escape(message)
