"""PrivacyBudget with a real Trainer: calibration, stopping, logging, checkpoints and resume."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import Classifier, loader, make_dataset, pld_epsilon, tensorboard_scalars, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.core.accounting import compute_epsilon

DELTA = 1e-5


def oracle_max_steps(sigma: float, q: float, epsilon: float, hi: int = 4096) -> int:
    """Largest step count the tight (PLD) accountant allows, by bisection."""
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pld_epsilon([(sigma, q, mid)], DELTA) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_fixed_noise_stops_just_before_the_tight_accountant_would(accountant: str) -> None:
    sigma, q, target = 1.0, 8 / 64, 3.0
    budget = PrivacyBudget(epsilon=target, delta=DELTA, accountant=accountant)
    t = trainer(max_epochs=100, strategy=DPStrategy(noise_multiplier=sigma), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    steps = budget.steps
    assert t.global_step == steps == t.strategy.history.steps  # every step accounted, none after
    assert budget.epsilon_spent <= target
    assert compute_epsilon([(sigma, q, steps + 1)], DELTA, accountant) > target  # stopped *before* overspending
    tight = oracle_max_steps(sigma, q, target)
    assert steps <= tight  # never after the tightest accountant
    slack = 3 if accountant == "prv" else int(0.5 * tight)  # RDP is a looser bound by design
    assert steps >= tight - slack
    assert "stopping after" in budget.stopped_reason


def test_calibrated_noise_spends_the_budget_over_the_plan() -> None:
    target = 2.0
    budget = PrivacyBudget(epsilon=target, delta=DELTA)
    t = trainer(max_epochs=3, strategy=DPStrategy(), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == 24  # the whole plan ran
    sigma = budget.noise_multiplier
    assert 0.9 * target <= budget.epsilon_spent <= target
    assert pld_epsilon([(sigma, 8 / 64, 24)], DELTA) <= target + 0.01


def test_calibration_respects_max_steps_and_limit_train_batches() -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=DELTA)
    t = trainer(max_epochs=10, max_steps=30, limit_train_batches=4, strategy=DPStrategy(), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == 30
    assert 1.8 <= budget.epsilon_spent <= 2.0


def test_budget_stop_overrides_min_epochs_with_a_warning() -> None:
    budget = PrivacyBudget(epsilon=1.0, delta=DELTA, accountant="rdp")
    t = trainer(min_epochs=30, max_epochs=40, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget])
    with pytest.warns(UserWarning, match="overrides min_epochs=30"):
        t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == budget.allowed_steps < 30 * 8
    assert budget.epsilon_spent <= 1.0


def test_budget_too_small_for_one_step_trains_nothing() -> None:
    model = Classifier()
    budget = PrivacyBudget(epsilon=0.01, delta=DELTA, accountant="rdp")
    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=0.5), callbacks=[budget])
    t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == 0
    assert budget.epsilon_spent == 0




def test_epsilon_and_friends_in_tensorboard_event_files(tmp_path: Path) -> None:
    sigma = 1.1
    budget = PrivacyBudget(epsilon=4.0, delta=DELTA)
    logger = TensorBoardLogger(tmp_path, name="run")
    t = trainer(max_epochs=3, logger=logger, log_every_n_steps=4,
                strategy=DPStrategy(noise_multiplier=sigma), callbacks=[budget])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    scalars = tensorboard_scalars(tmp_path)
    for tag in ("dp/epsilon", "dp/noise_multiplier", "dp/sample_rate", "dp/steps", "dp/delta"):
        assert tag in scalars, tag
    eps, steps = scalars["dp/epsilon"], dict(scalars["dp/steps"])
    assert len(eps) == t.global_step // 4
    values = [v for _, v in eps]
    assert values == sorted(values)
    for step, value in eps:
        n = int(steps[step])
        assert n == step + 1  # logged after the (step+1)-th private step
        # From the plan's table: an upper bound (never below the independent oracle), close to the
        # accountant's figure, and exactly it at the plan's end.
        exact = compute_epsilon([(sigma, 0.125, n)], DELTA)
        assert value >= pld_epsilon([(sigma, 0.125, n)], DELTA) - 1e-3
        assert value <= 1.15 * exact
    assert values[-1] == pytest.approx(budget.epsilon_spent, rel=1e-6)
    assert all(v == pytest.approx(sigma) for _, v in scalars["dp/noise_multiplier"])
    assert all(v == pytest.approx(0.125) for _, v in scalars["dp/sample_rate"])
    assert all(v == pytest.approx(DELTA) for _, v in scalars["dp/delta"])
    assert "dp/epsilon" in t.progress_bar_metrics


def _fit_with_checkpoints(tmp_path: Path, budget: PrivacyBudget, epochs: int, sigma: float | None,
                          batch_size: int = 8, ckpt_path: str | None = None, every: int = 1) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=every, save_top_k=-1)
    t = trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[budget, ckpt],
                strategy=DPStrategy(noise_multiplier=sigma))
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=batch_size), ckpt_path=ckpt_path)
    return t


def test_resume_continues_epsilon_exactly(tmp_path: Path) -> None:
    sigma = 1.0
    first = PrivacyBudget(epsilon=50.0, delta=DELTA)
    _fit_with_checkpoints(tmp_path, first, epochs=2, sigma=sigma)
    assert first.steps == 16
    # A fresh process would build a fresh callback and strategy: only the checkpoint remembers.
    resumed = PrivacyBudget(epsilon=50.0, delta=DELTA)
    t = _fit_with_checkpoints(tmp_path / "b", resumed, epochs=4, sigma=sigma,
                              ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t.global_step == resumed.steps == 32
    uninterrupted = compute_epsilon([(sigma, 0.125, 32)], DELTA)
    assert resumed.epsilon_spent == pytest.approx(uninterrupted, rel=1e-9)
    assert resumed.epsilon_spent > first.epsilon_spent
    assert resumed.epsilon_spent >= pld_epsilon([(sigma, 0.125, 32)], DELTA) - 0.01


def test_resume_with_another_sample_rate_and_noise_composes_both(tmp_path: Path) -> None:
    first = PrivacyBudget(epsilon=50.0, delta=DELTA)
    _fit_with_checkpoints(tmp_path, first, epochs=1, sigma=1.0)
    resumed = PrivacyBudget(epsilon=50.0, delta=DELTA)
    t = _fit_with_checkpoints(tmp_path / "b", resumed, epochs=3, sigma=1.5, batch_size=16,
                              ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    segments = resumed.history.segments
    assert segments[0] == (1.0, 0.125, 8)
    assert len(segments) == 2 and segments[1][:2] == (1.5, 0.25) and segments[1][2] >= 4
    assert t.global_step == resumed.steps
    assert resumed.epsilon_spent == pytest.approx(compute_epsilon(segments, DELTA))
    assert resumed.epsilon_spent >= pld_epsilon(segments, DELTA) - 0.01


def test_resume_with_calibration_recalibrates_over_the_history(tmp_path: Path) -> None:
    target = 2.0
    first = PrivacyBudget(epsilon=target, delta=DELTA)
    _fit_with_checkpoints(tmp_path, first, epochs=2, sigma=None)
    resumed = PrivacyBudget(epsilon=target, delta=DELTA)
    t = _fit_with_checkpoints(tmp_path / "b", resumed, epochs=4, sigma=None,
                              ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t.global_step == resumed.steps == 32
    assert len(resumed.history.segments) == 2  # more noise for the extended plan
    assert resumed.history.segments[1][0] > resumed.history.segments[0][0]
    assert 0.9 * target <= resumed.epsilon_spent <= target


def test_resuming_a_checkpoint_trained_without_accounting_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    plain = trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt])
    plain.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=1.0),
                callbacks=[PrivacyBudget(epsilon=5.0, delta=DELTA)])
    with pytest.raises(ValueError, match="not accounted"):
        t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=str(tmp_path / "last.ckpt"))


def test_state_dict_round_trip_and_bad_state() -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=DELTA)
    budget.history.record(1.0, 0.1, 5)
    state = budget.state_dict()
    other = PrivacyBudget(epsilon=3.0, delta=DELTA)
    other.load_state_dict(state)
    assert other.history.segments == [(1.0, 0.1, 5)]
    assert other.epsilon_spent == budget.epsilon_spent
    with pytest.raises(ValueError, match="history"):
        other.load_state_dict({"epsilon": 3.0})
    assert other.history.segments == [(1.0, 0.1, 5)]  # a bad state corrupts nothing


def test_fit_twice_and_validate_share_one_ledger_and_leave_no_hooks() -> None:
    model = Classifier()
    budget = PrivacyBudget(epsilon=50.0, delta=DELTA)
    dl = loader(make_dataset(n=64), batch_size=8)
    val_sizes: list[int] = []

    class ValSizes(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            val_sizes.append(len(batch[0]))

    for _ in range(2):
        t = trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget, ValSizes()])
        t.fit(model, dl, torch.utils.data.DataLoader(make_dataset(n=20), batch_size=8))
        assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert budget.steps == 16  # the second fit continued the first's ledger
    assert val_sizes == [8, 8, 4] * 2  # validation batches untouched by Poisson sampling
    t.validate(model, torch.utils.data.DataLoader(make_dataset(n=20), batch_size=8))
    assert val_sizes[-3:] == [8, 8, 4]
    assert budget.steps == 16


def test_lr_find_runs_and_its_steps_stay_spent() -> None:
    from lightning.pytorch.tuner import Tuner

    budget = PrivacyBudget(epsilon=50.0, delta=DELTA)
    model = Classifier(lr=0.1)
    dl = loader(make_dataset(n=64), batch_size=8)
    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget])
    result = Tuner(t).lr_find(model, train_dataloaders=dl, num_training=10, early_stop_threshold=None)
    assert result is not None and math.isfinite(result.suggestion() or 1.0)
    spent_by_search = budget.steps
    assert spent_by_search == 10  # the search's steps touched the data: they stay on the ledger
    t.fit(model, dl)
    assert budget.steps == spent_by_search + 16


def test_strategy_registered_by_name() -> None:
    t = L.Trainer(strategy="dp", accelerator="cpu", logger=False)
    assert isinstance(t.strategy, DPStrategy)
    assert t.strategy.max_grad_norm == 1.0


def test_budget_and_strategy_from_lightning_cli_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    from conftest import Data

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  strategy:
    class_path: lightning_dp.DPStrategy
    init_args:
      max_grad_norm: 0.5
  callbacks:
    - class_path: lightning_dp.PrivacyBudget
      init_args:
        epsilon: 2.0
        delta: 1.0e-5
        accountant: rdp
"""
    )
    cli = LightningCLI(Classifier, Data, args=["fit", "--config", str(config)], save_config_callback=None)
    budget = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PrivacyBudget))
    assert cli.trainer.strategy.max_grad_norm == 0.5
    assert budget.steps == 8 and 1.8 <= budget.epsilon_spent <= 2.0


def test_a_resumed_run_does_not_replay_the_first_runs_poisson_draws(tmp_path: Path) -> None:
    from conftest import Batches

    def run(epochs: int, ckpt_path: str | None) -> list[list[float]]:
        L.seed_everything(0, verbose=False)  # the same seed in both runs, as a resume script would
        rec = Batches()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        t = trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[rec, ckpt],
                    strategy=DPStrategy(noise_multiplier=1.0))
        with pytest.warns(UserWarning):
            t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8), ckpt_path=ckpt_path)
        return [sorted(c[0][:, 0].tolist()) for b in rec.batches for c in b.chunks]

    first = run(1, None)
    resumed = run(2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(first) > 4 and len(resumed) > 4
    assert first != resumed


def test_resuming_with_a_larger_epsilon_or_another_delta_warns() -> None:
    spent = PrivacyBudget(epsilon=2.0, delta=1e-5)
    spent.history.record(1.0, 0.01, 100)
    state = spent.state_dict()
    with pytest.warns(UserWarning, match="budgeted at epsilon=2 with epsilon=3: the budget is raised"):
        PrivacyBudget(epsilon=3.0, delta=1e-5).load_state_dict(state)
    with pytest.warns(UserWarning, match="accounted with delta=1e-05, this callback uses delta=1e-06"):
        PrivacyBudget(epsilon=2.0, delta=1e-6).load_state_dict(state)
    same = PrivacyBudget(epsilon=1.5, delta=1e-5)  # a smaller budget: the stricter one, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
    assert same.steps == 100


def test_logging_every_step_costs_no_accountant_query_per_step(tmp_path: Path) -> None:
    from lightning_dp.core.accounting import _epsilon
    from lightning_dp.core.risk import _profile

    def queries(steps: int) -> int:
        _epsilon.cache_clear()
        _profile.cache_clear()
        t = trainer(max_steps=steps, logger=TensorBoardLogger(tmp_path, name=f"run{steps}"), log_every_n_steps=1,
                    strategy=DPStrategy(noise_multiplier=1.0), callbacks=[PrivacyBudget(epsilon=50.0, delta=DELTA,
                                                                                        report=False)])
        t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))
        assert len(tensorboard_scalars(tmp_path / f"run{steps}")["dp/epsilon"]) == steps
        return _epsilon.cache_info().misses + _profile.cache_info().misses

    short, long = queries(10), queries(60)
    assert long <= short + 2  # the plan's table, not a query per logged step
