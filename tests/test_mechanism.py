"""The DP-SGD update a real Trainer applies, checked against brute-force per-example gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning as L

from conftest import Batches, Classifier, clipped_sum, loader, make_dataset, per_example_grads, snapshot, trainer
from lightning_dp import DPStrategy






def _one_step_update(max_physical: int | None, max_grad_norm: float, reduction: str = "mean") -> None:
    ds = make_dataset(n=48)
    model = Classifier(lr=1.0, reduction=reduction)
    before = snapshot(model)
    reference = Classifier(reduction=reduction)
    reference.load_state_dict(model.state_dict())
    rec = Batches()
    t = trainer(
        max_steps=1,
        callbacks=[rec],
        strategy=DPStrategy(
            max_grad_norm=max_grad_norm, noise_multiplier=0.0, max_physical_batch_size=max_physical,
            loss_reduction=reduction,
        ),
    )
    with pytest.warns(UserWarning, match="NOT differentially private"):
        t.fit(model, loader(ds, batch_size=16))
    x, y = rec.examples
    assert len(x) > 0
    if max_physical is not None:
        assert all(len(c[0]) <= max_physical for c in rec.batches[0].chunks)
        assert len(rec.batches[0].chunks) > 1
    grads = per_example_grads(reference, x, y, reference.loss)
    expected = [g / 16 for g in clipped_sum(grads, max_grad_norm, list(reference.parameters()))]
    for b, a, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - a.detach(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_physical", [None, 3])
def test_update_is_clipped_mean_of_per_example_grads(max_physical: int | None) -> None:
    # C small enough that clipping binds for most examples.
    _one_step_update(max_physical, max_grad_norm=0.1)


def test_update_with_sum_reduced_loss() -> None:
    _one_step_update(None, max_grad_norm=0.5, reduction="sum")


def test_physical_chunks_give_one_update_per_poisson_batch(no_spot_checks) -> None:
    ds = make_dataset(n=64)
    model = Classifier()
    rec = Batches()
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=0.0, max_physical_batch_size=2), callbacks=[rec])
    with pytest.warns(UserWarning):
        t.fit(model, loader(ds, batch_size=16))
    assert t.global_step == 3
    assert t.strategy.history.steps == 3
    assert all(sum(b.sizes) == b.size and max(b.sizes) <= 2 for b in rec.batches)
    # Several chunks per step and one training_step per chunk, plus the 2-example check's 5 calls:
    # each example alone and both together (plain autograd), both and one of them (the engine).
    assert model.training_step_calls == sum(len(b.chunks) for b in rec.batches) + 5


class ZeroGrad(Classifier):
    """Its loss has zero gradient for every example, so the update is pure noise."""

    def __init__(self) -> None:
        super().__init__(d=50, k=40, hidden=50)
        self.net = nn.Linear(50, 200)

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, _ = batch
        return (self.net(torch.zeros_like(x)) * 0.0).mean()


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_std_matches_sigma_c_over_expected_batch(secure_mode: bool) -> None:
    sigma, c, b = 1.5, 2.0, 8
    model = ZeroGrad()
    before = snapshot(model)
    t = trainer(max_steps=1, strategy=DPStrategy(max_grad_norm=c, noise_multiplier=sigma, secure_mode=secure_mode))
    with pytest.warns(UserWarning, match="without a PrivacyBudget"):
        t.fit(model, loader(make_dataset(n=64, d=50), batch_size=b))
    delta = torch.cat([(p0 - p.detach()).flatten() for p0, p in zip(before, model.parameters())])
    expected = sigma * c / b
    n = delta.numel()  # 10,200 coordinates: the std estimate is good to ~1.4%
    assert abs(delta.std().item() / expected - 1) < 0.05
    assert abs(delta.mean().item()) < 4 * expected / math.sqrt(n)


def test_empty_batches_take_an_accounted_noise_only_step(no_spot_checks) -> None:
    # q = 1/40: most draws are empty.
    ds = make_dataset(n=40)
    model = Classifier()
    rec = Batches()
    logged: list[float] = []

    class LossWatch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "train_loss" in trainer.callback_metrics:
                logged.append(float(trainer.callback_metrics["train_loss"]))

    t = trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[rec, LossWatch()])
    before = snapshot(model)
    with pytest.warns(UserWarning):
        t.fit(model, loader(ds, batch_size=1))
    sizes = rec.sizes
    assert len(sizes) == 80 and sizes.count(0) > 20
    assert t.global_step == 80 == t.strategy.history.steps
    # training_step ran once per non-empty draw, plus 11 calls of the 8-example start-of-fit check:
    # each example alone and all together (plain autograd), all and all but one (the engine).
    assert model.training_step_calls == sum(1 for s in sizes if s > 0) + 11
    assert all(math.isfinite(v) for v in logged)
    assert any((a != b).any() for a, b in zip(before, model.parameters()))  # the noise moved them


def test_empty_batch_with_zero_noise_leaves_parameters_unchanged() -> None:
    ds = make_dataset(n=200)
    model = Classifier()
    seen_empty: list[bool] = []

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.params = snapshot(pl_module)
            x, _ = batch  # the user's own batch format, also for an empty draw
            self.empty = len(x) == 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.empty:
                seen_empty.append(all(torch.equal(a, b) for a, b in zip(self.params, pl_module.parameters())))
                assert not outputs  # Lightning turns the skipped step's None into {}

    t = trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=0.0), callbacks=[Stop()])
    with pytest.warns(UserWarning):
        t.fit(model, loader(ds, batch_size=1))
    assert seen_empty and all(seen_empty)


class EpochLogger(Classifier):
    records: list[tuple[float, int]] = []

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 0:
            self.records: list[tuple[float, int]] = []  # drop the start-of-fit check's calls

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = self.loss(x, y)
        self.records.append((loss.item(), len(x)))
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def test_epoch_metrics_logged_per_chunk_are_weighted_by_chunk_size(no_spot_checks) -> None:
    model = EpochLogger(lr=0.1)
    t = trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=3))
    with pytest.warns(UserWarning):
        t.fit(model, loader(make_dataset(n=64), batch_size=8))
    total = sum(n for _, n in model.records)
    expected = sum(v * n for v, n in model.records) / total
    assert float(t.callback_metrics["train_loss"]) == pytest.approx(expected, rel=1e-5)


def test_bf16_mixed_precision_trains_privately() -> None:
    from lightning_dp import PrivacyBudget

    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    model = Classifier(lr=0.1)
    t = trainer(max_epochs=2, precision="bf16-mixed", strategy=DPStrategy(max_physical_batch_size=4), callbacks=[budget])
    t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == budget.steps == 16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


class AdamWithSchedule(Classifier):
    def configure_optimizers(self):  # type: ignore[override]
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def test_any_optimizer_and_lr_scheduler_step_as_usual() -> None:
    model = AdamWithSchedule()
    t = trainer(max_epochs=3, strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.warns(UserWarning):
        t.fit(model, loader(make_dataset(n=64), batch_size=8))
    opt = t.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert all(opt.state[p]["step"] == 24 for p in model.parameters())


class StepLogger(Classifier):
    records: list[tuple[float, int]] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.records = []

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = self.loss(x, y)
        self.records.append((loss.item(), len(x)))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        self.log_dict({"examples_in_chunk": float(len(x))})
        return loss


def test_logs_from_chunks_are_logged_once_per_step_for_the_whole_batch(no_spot_checks) -> None:
    seen: list[tuple[float, float, float]] = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(batch[0]):
                recs = pl_module.records
                mean = sum(v * n for v, n in recs) / sum(n for _, n in recs)
                seen.append((float(trainer.callback_metrics["train_loss"]), mean, len(recs)))
                assert float(trainer.callback_metrics["examples_in_chunk"]) == pytest.approx(
                    sum(n * n for _, n in recs) / sum(n for _, n in recs))

    model = StepLogger(lr=0.1)
    t = trainer(max_steps=4, callbacks=[Watch()], strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=3))
    with pytest.warns(UserWarning):
        t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert seen and any(k > 1 for _, _, k in seen)  # several chunks per step ...
    for logged, mean, _ in seen:
        assert logged == pytest.approx(mean, rel=1e-5)  # ... one value: the whole batch's


class Unfreeze(L.Callback):
    """Like BaseFinetuning: the first layer trains only from the third step on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for p in pl_module.net[0].parameters():
            p.requires_grad_(trainer.global_step >= 2)


def test_layers_unfrozen_mid_run_are_clipped_and_noised_too() -> None:
    model = Classifier(lr=0.1)
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    frozen_before = snapshot(model)[:2]
    t = trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[Unfreeze()])
    with pytest.warns(UserWarning):
        t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, list(model.parameters())[:2]))
    t = trainer(max_steps=4, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[Unfreeze()])
    with pytest.warns(UserWarning):
        t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert t.global_step == 4
    assert not any(torch.equal(a, b) for a, b in zip(frozen_before, list(model.parameters())[:2]))
