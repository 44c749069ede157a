"""Every loader path is accounted at the rate it trains with: Lightning's tuners (which swap the
callbacks out and reload loaders while the stage says TRAINING) and loaders reloaded mid-run."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader

from conftest import Classifier, loader, make_dataset, pld_epsilon, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.core.accounting import PrivacyHistory, calibrate_noise

N = 64


class Tunable(Classifier):
    """A module that owns its loaders, as the tuners need: a validation set larger than the
    training set and drawn in other batches (10 of 100: rate 0.1), so a validation loader mistaken
    for the training one has a rate no training loader here has (4, 8 or 16 of 64)."""

    def __init__(self, empty_val: bool = False) -> None:
        super().__init__(lr=0.1)
        self.batch_size = 4
        self.empty_val = empty_val
        self.trained_rates: list[float] = []

    def train_dataloader(self) -> DataLoader:
        return loader(make_dataset(n=N), batch_size=self.batch_size)

    def val_dataloader(self) -> Any:
        return [] if self.empty_val else loader(make_dataset(n=1000, seed=1), batch_size=100, shuffle=False)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # The rate of the batch that just trained, read from the loader that drew it.
        self.trained_rates.append(self.trainer.strategy.train_dataloader.batch_sampler.sample_rate)


def rates_on_the_ledger(budget: PrivacyBudget) -> list[float]:
    return [q for _, q, n in budget.history.segments for _ in range(n)]


@pytest.mark.parametrize("noise, epsilon", [(None, 3.0), (1.0, 8.0)], ids=["calibrated", "fixed"])
def test_scale_batch_size_steps_are_accounted_at_the_rate_they_trained(noise, epsilon) -> None:
    budget = PrivacyBudget(epsilon=epsilon, delta=1e-5)
    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=noise), callbacks=[budget])
    model = Tunable()
    size = Tuner(t).scale_batch_size(model, mode="power", init_val=4, max_trials=3, steps_per_trial=2)
    assert size == 16 and model.batch_size == 16
    tuner_steps = budget.steps
    assert tuner_steps == 6  # three trials of two steps, all on the ledger
    t.fit(model)
    assert budget.steps > tuner_steps  # the real run still trains
    # Every step on the ledger at the rate its batch was drawn with, never the validation loader's.
    assert rates_on_the_ledger(budget) == model.trained_rates
    assert set(model.trained_rates) == {4 / N, 8 / N, 16 / N}
    assert budget.epsilon_spent <= epsilon
    assert pld_epsilon(budget.history.segments, 1e-5) <= epsilon + 0.02


def test_a_validation_loader_returning_an_empty_list_does_not_break_the_tuner() -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    t = trainer(max_epochs=1, strategy=DPStrategy(), callbacks=[budget])
    model = Tunable(empty_val=True)
    assert Tuner(t).scale_batch_size(model, mode="power", init_val=4, max_trials=2, steps_per_trial=1) == 8
    t.fit(model)
    assert budget.epsilon_spent <= 3.0 and budget.steps > 2


def test_lr_find_with_calibrated_noise_works_and_its_steps_stay_on_the_ledger() -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    t = trainer(max_epochs=3, strategy=DPStrategy(), callbacks=[budget])
    model = Tunable()
    finder = Tuner(t).lr_find(model, num_training=10, early_stop_threshold=None)
    assert finder is not None and len(finder.results["lr"]) == 10
    assert budget.steps == 10
    # The noise of the tuner's steps was calibrated for the configured run (3 epochs of 16
    # steps), not for the tuner's 10 steps, which would have spent the whole budget on them.
    ((sigma, q, steps),) = budget.history.segments
    assert q == 4 / N and steps == 10
    assert sigma == calibrate_noise(PrivacyHistory(), q, 3 * (N // 4), epsilon=3.0, delta=1e-5)
    assert budget.epsilon_spent < 2.5
    t.fit(model)
    assert budget.steps == 10 + 3 * (N // 4)
    assert 2.7 <= budget.epsilon_spent <= 3.0
    assert rates_on_the_ledger(budget) == model.trained_rates


class GrowingBatches(Tunable):
    """A training loader reloaded every epoch with a larger batch size: a mid-run change of rate."""

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return loader(make_dataset(n=N), batch_size=4 * 2 ** epoch)


def test_a_tuner_that_runs_out_of_budget_stops_and_says_so() -> None:
    budget = PrivacyBudget(epsilon=1.5, delta=1e-5)
    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget])
    with pytest.warns(UserWarning, match="tuner's trial run"):
        Tuner(t).scale_batch_size(Tunable(), mode="power", init_val=4, max_trials=4, steps_per_trial=3)
    assert 0 < budget.steps == budget.allowed_steps
    assert budget.epsilon_spent <= 1.5


def test_a_loader_reloaded_with_another_rate_is_planned_and_recorded_at_that_rate() -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=1e-5, accountant="rdp")
    t = trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, strategy=DPStrategy(noise_multiplier=1.5),
                callbacks=[budget])
    model = GrowingBatches()
    t.fit(model)
    assert rates_on_the_ledger(budget) == model.trained_rates
    assert len(set(model.trained_rates)) >= 2
    assert budget.epsilon_spent <= 2.0
