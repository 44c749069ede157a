"""The one-run audit bound against the reference values of Steinke, Nasr & Jagielski (2023)."""

from __future__ import annotations

import pytest

from lightning_dp.lightning.audit import audit_p_value, epsilon_lower_bound


@pytest.mark.parametrize(
    "m, r, v, delta, expected",
    [(1000, 100, 100, 0.0, 3.4930), (1000, 100, 90, 0.0, 1.6308), (1000, 100, 90, 1e-5, 1.6261),
     (1000, 1000, 600, 1e-5, 0.2972)],
)
def test_reference_values(m: int, r: int, v: int, delta: float, expected: float) -> None:
    assert epsilon_lower_bound(m, r, v, delta, p=0.05) == pytest.approx(expected, abs=1e-4)


def test_the_bound_is_the_edge_of_what_the_data_rule_out() -> None:
    eps = epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert audit_p_value(1000, 100, 90, eps - 1e-3, 1e-5) < 0.05 <= audit_p_value(1000, 100, 90, eps + 1e-3, 1e-5)


def test_chance_level_guessing_claims_nothing() -> None:
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 0.0) == 0.0


def test_more_correct_guesses_and_more_confidence_move_the_bound_the_right_way() -> None:
    assert epsilon_lower_bound(1000, 100, 95, 1e-5) > epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, p=0.01) < epsilon_lower_bound(1000, 100, 90, 1e-5, p=0.05)


@pytest.mark.parametrize(
    "kw", [{"m": 10, "r": 20, "v": 5, "delta": 0.0}, {"m": 10, "r": 5, "v": 6, "delta": 0.0},
           {"m": 10, "r": 5, "v": 3, "delta": 1.0}, {"m": 10, "r": 5, "v": 3, "delta": 0.0, "p": 0.0},
           {"m": 10, "r": 0, "v": 0, "delta": 0.0}],
)
def test_bad_input_is_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(**kw)


# ---------------------------------------------------------------------- the PrivacyAudit callback
import csv  # noqa: E402
import math  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset  # noqa: E402

from conftest import Batches, Classifier, pld_epsilon, trainer  # noqa: E402
from lightning_dp import DPStrategy, PrivacyAudit, PrivacyBudget  # noqa: E402
from lightning_dp.core.accounting import compute_epsilon  # noqa: E402

# Canaries a model can memorise: random labels on nearly orthogonal inputs (d >> examples),
# so training on one barely moves the loss of another.
D, K, N, M, GUESSES, DELTA, EPOCHS, BATCH = 500, 10, 100, 400, 100, 1e-5, 40, 50


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(m: int = M) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    base = TensorDataset(torch.randn(N, D, generator=g), torch.randint(0, K, (N,), generator=g))
    canaries = TensorDataset(torch.randn(m, D, generator=g), torch.randint(0, K, (m,), generator=g))
    return base, canaries


def _fit(audit: PrivacyAudit, strategy: DPStrategy, callbacks: list, epochs: int = EPOCHS, **kw: Any
         ) -> tuple[L.Trainer, Classifier]:
    base, _ = _data(len(audit.canaries))  # type: ignore[arg-type]
    model = Classifier(d=D, k=K, hidden=64, lr=1.0)
    t = trainer(max_epochs=epochs, strategy=strategy, callbacks=[*callbacks, audit], **kw)
    t.fit(model, DataLoader(audit.insert(base), batch_size=BATCH, shuffle=True))
    return t, model


@pytest.mark.slow
def test_a_run_without_privacy_is_caught_far_above_what_dp_would_claim() -> None:
    audit = PrivacyAudit(_data()[1], guesses=GUESSES, delta=DELTA, seed=3)
    t, _ = _fit(audit, DPStrategy(max_grad_norm=1e6, noise_multiplier=0.0), [])
    history = t.strategy.history
    [(sigma, q, steps)] = history.segments
    n = N + audit.included  # the canaries drawn in are training data: they set q
    assert sigma == 0.0 and q == BATCH / n and steps == EPOCHS * math.ceil(n / BATCH)
    result = audit.result
    assert result is not None
    # What this configuration (same q, same steps) would claim with noise 10: our accountant
    # and Google's PLD agree on it.
    claimed = compute_epsilon([(10.0, q, steps)], DELTA)
    assert claimed == pytest.approx(pld_epsilon([(10.0, q, steps)], DELTA), abs=0.02)
    assert result.epsilon_lower_bound > 2.5 * claimed
    assert result.epsilon_lower_bound == epsilon_lower_bound(M, GUESSES, result.correct, DELTA, 0.05)


@pytest.mark.slow
def test_a_dp_run_stays_below_its_claimed_epsilon(tmp_path: Path) -> None:
    audit = PrivacyAudit(_data()[1], guesses=GUESSES, seed=3)  # delta from the budget
    budget = PrivacyBudget(epsilon=1.0, delta=DELTA, report=False)
    logger = CSVLogger(tmp_path, name="run")
    t, _ = _fit(audit, DPStrategy(max_grad_norm=1.0), [budget], logger=logger, log_every_n_steps=70)
    result = audit.result
    assert result is not None and result.delta == DELTA and result.guesses == GUESSES and result.canaries == M
    assert budget.steps > 0 and budget.noise_multiplier > 1
    assert result.epsilon_lower_bound <= budget.epsilon_spent <= 1.0
    # Logged next to dp/epsilon, at the last step.
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("dp/audit/epsilon_lower_bound")]
    assert len(logged) == 1 and float(logged[0]["dp/audit/epsilon_lower_bound"]) == pytest.approx(
        result.epsilon_lower_bound)
    assert int(logged[0]["step"]) == t.global_step
    assert float(logged[0]["dp/audit/correct"]) == result.correct
    assert any(r.get("dp/epsilon") for r in rows)


def test_only_the_canaries_drawn_in_are_trained_on() -> None:
    base, canaries = _data(m=40)
    audit = PrivacyAudit(canaries, seed=5, delta=DELTA)
    seen = Batches()
    _fit(audit, DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0), [seen], epochs=6)
    x, _ = seen.examples
    drawn_in = {tuple(canaries[i][0][:4].tolist()) for i in range(40) if audit.state_dict()["included"][i]}
    trained = {tuple(row[:4].tolist()) for row in x}
    canary_rows = {tuple(canaries[i][0][:4].tolist()) for i in range(40)}
    assert 0 < audit.included < 40 and len(drawn_in) == audit.included
    assert trained & canary_rows == drawn_in  # every canary in was sampled at least once, none out ever
    assert trained - canary_rows <= {tuple(base[i][0][:4].tolist()) for i in range(N)}


def test_a_custom_score_is_called_on_each_canary_alone_before_and_after_training() -> None:
    calls: list[tuple[bool, int]] = []

    def score(module: L.LightningModule, batch: Any) -> float:
        x, y = batch
        calls.append((module.training, len(x)))
        return -float(module.loss(x, y).mean())

    audit = PrivacyAudit(_data(m=10)[1], guesses=4, seed=0, delta=DELTA, score_fn=score)
    _fit(audit, DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0), [], epochs=1)
    assert calls == [(False, 1)] * 20
    assert audit.result is not None and audit.result.guesses == 4 and audit.result.canaries == 10


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # a fresh directory for the resumed run
def test_a_resumed_run_audits_the_same_canaries_from_the_same_start(tmp_path: Path) -> None:
    _, canaries = _data(m=30)
    first = PrivacyAudit(canaries, seed=1, delta=DELTA)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(first, DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0), [ckpt], epochs=1, enable_checkpointing=True)
    saved = first.state_dict()

    second = PrivacyAudit(canaries, seed=2, delta=DELTA)  # other draws, replaced by the checkpoint's
    assert second.state_dict()["included"] != saved["included"]
    base, _ = _data(m=30)
    train_set = second.insert(base)  # built before fit, as a script would
    t = trainer(max_epochs=2, strategy=DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0),
                callbacks=[ModelCheckpoint(dirpath=tmp_path / "resumed", save_last=True), second],
                enable_checkpointing=True)
    t.fit(Classifier(d=D, k=K, hidden=64), DataLoader(train_set, batch_size=BATCH, shuffle=True),
          ckpt_path=str(tmp_path / "last.ckpt"))
    state = second.state_dict()
    assert state["included"] == saved["included"] and state["start_scores"] == saved["start_scores"]
    assert len(train_set) == N + sum(saved["included"])
    assert second.result is not None and second.result.included == first.result.included


def test_the_state_round_trips() -> None:
    _, canaries = _data(m=12)
    a, b = PrivacyAudit(canaries, seed=1), PrivacyAudit(canaries, seed=9)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.included == a.included
    with pytest.raises(ValueError, match="drew 12 canaries, this one has 5"):
        PrivacyAudit(_data(m=5)[1]).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------- refusals
def _quick(audit: PrivacyAudit, data: Any, callbacks: Optional[list] = None, model: Any = None) -> None:
    t = trainer(max_epochs=1, strategy=DPStrategy(max_grad_norm=1.0, noise_multiplier=1.0),
                callbacks=[*(callbacks or []), audit])
    t.fit(model or Classifier(d=D, k=K, hidden=8), data)


def test_training_without_the_canaries_is_refused() -> None:
    base, canaries = _data(m=10)
    audit = PrivacyAudit(canaries, delta=DELTA)
    audit.insert(base)
    with pytest.raises(ValueError, match="does not hold this audit's canaries"):
        _quick(audit, DataLoader(base, batch_size=BATCH))
    with pytest.raises(ValueError, match="does not hold this audit's canaries"):  # wrapped again
        _quick(audit, DataLoader(ConcatDataset([audit.insert(base)]), batch_size=BATCH))
    with pytest.raises(ValueError, match="does not hold this audit's canaries"):  # another audit's
        _quick(audit, DataLoader(PrivacyAudit(canaries).insert(base), batch_size=BATCH))


def test_a_sampler_that_skips_examples_is_refused() -> None:
    base, canaries = _data(m=10)
    audit = PrivacyAudit(canaries, delta=DELTA)
    train_set = audit.insert(base)
    sampler = torch.utils.data.SubsetRandomSampler(range(N))  # never the canaries
    t = trainer(max_epochs=1, callbacks=[audit])  # a non-DP baseline run is audited too
    with pytest.raises(ValueError, match="does not draw from all"):
        t.fit(Classifier(d=D, k=K, hidden=8), DataLoader(train_set, batch_size=BATCH, sampler=sampler))


def test_an_audit_needs_a_delta() -> None:
    base, canaries = _data(m=10)
    audit = PrivacyAudit(canaries)
    with pytest.raises(ValueError, match=r"pass PrivacyAudit\(\.\.\., delta=\.\.\.\) or add a PrivacyBudget"):
        _quick(audit, DataLoader(audit.insert(base), batch_size=BATCH))


def test_manual_optimization_needs_a_score_fn() -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(d=D, k=K, hidden=8)
            self.automatic_optimization = False

    base, canaries = _data(m=10)
    audit = PrivacyAudit(canaries, delta=DELTA)
    with pytest.raises(ValueError, match="score_fn"):
        _quick(audit, DataLoader(audit.insert(base), batch_size=BATCH), model=Manual())


@pytest.mark.parametrize(
    "kw, error",
    [({"canaries": TensorDataset(torch.zeros(1, 2))}, "at least 2 canaries"),
     ({"p": 0.0}, "p must be"), ({"p": 1}, "p must be"),
     ({"guesses": 3}, "even integer"), ({"guesses": 12}, "even integer"), ({"guesses": 0}, "even integer"),
     ({"delta": 1.0}, "delta must be"), ({"delta": -1e-5}, "delta must be"),
     ({"score_fn": "loss"}, "score_fn must be callable"), ({"seed": 1.5}, "seed must be")],
)
def test_bad_arguments_are_refused(kw: dict, error: str) -> None:
    args = {"canaries": TensorDataset(torch.zeros(10, 2)), **kw}
    with pytest.raises((ValueError, TypeError), match=error):
        PrivacyAudit(**args)


def test_bad_datasets_are_refused() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[int]:
            yield 0

    with pytest.raises(TypeError, match="map-style Dataset"):
        PrivacyAudit(Stream())
    audit = PrivacyAudit(TensorDataset(torch.zeros(10, 2)))
    with pytest.raises(TypeError, match="map-style training Dataset"):
        audit.insert(Stream())
    with pytest.raises(ValueError, match="insert them once"):
        audit.insert(audit.insert(TensorDataset(torch.zeros(10, 2))))
