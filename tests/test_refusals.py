"""Every input DP training cannot honour is refused, with an error that says what to change."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, WeightedRandomSampler
from torch.utils.data.sampler import BatchSampler, SequentialSampler

from conftest import Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy, PrivacyBudget, PrivacyBudgetExhausted, replace_batch_norm
from lightning_dp.mechanism.grads.check import PerSampleGradientMismatch
from lightning_dp.mechanism.modules import UnsupportedModuleError


def fit(model: L.LightningModule, dl: Any, **strategy_kw: Any) -> L.Trainer:
    strategy_kw.setdefault("noise_multiplier", 1.0)
    t = trainer(max_steps=2, strategy=DPStrategy(**strategy_kw))
    t.fit(model, dl)
    return t


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"loss_reduction": "median"}, "loss_reduction"),
        ({"engine": "magic"}, "engine"),
        ({"engine": "ghost-clipping"}, "engine"),
    ],
)
def test_strategy_arguments_are_validated(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPStrategy(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epsilon": 0, "delta": 1e-5}, "epsilon"),
        ({"epsilon": float("inf"), "delta": 1e-5}, "epsilon"),
        ({"epsilon": 1.0, "delta": 0}, "delta"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta"),
        ({"epsilon": 1.0, "delta": 1e-5, "accountant": "moments"}, "accountant"),
    ],
)
def test_budget_arguments_are_validated(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrivacyBudget(**kw)


# --------------------------------------------------------------------------- data
class Stream(IterableDataset):
    def __iter__(self):
        for _ in range(8):
            yield torch.randn(6), torch.tensor(0)


def test_iterable_dataset_is_refused() -> None:
    with pytest.raises(TypeError, match="IterableDataset"):
        fit(Classifier(), DataLoader(Stream(), batch_size=4))


def test_loader_without_batch_size_is_refused(dataset) -> None:
    dl = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 8, drop_last=False))
    with pytest.raises(ValueError, match="no batch_size"):
        fit(Classifier(), dl)


def test_weighted_sampler_is_refused(dataset) -> None:
    dl = DataLoader(dataset, batch_size=8, sampler=WeightedRandomSampler(torch.ones(len(dataset)), len(dataset)))
    with pytest.raises(ValueError, match="WeightedRandomSampler.*Subset"):
        fit(Classifier(), dl)


def test_batch_larger_than_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the training set"):
        fit(Classifier(), loader(make_dataset(n=10), batch_size=16))


# --------------------------------------------------------------------------- trainer settings
def test_gradient_accumulation_is_refused_and_points_to_physical_batches(dataset) -> None:
    t = trainer(max_steps=2, accumulate_grad_batches=2, strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        t.fit(Classifier(), loader(dataset))


def test_gradient_clip_val_is_refused(dataset) -> None:
    t = trainer(max_steps=2, gradient_clip_val=1.0, strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="max_grad_norm"):
        t.fit(Classifier(), loader(dataset))


def test_fp16_gradient_scaler_is_refused(dataset) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    # On CPU, Lightning turns precision="16-mixed" into bf16; build the fp16 plugin by hand.
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(max_steps=2, plugins=[scaled], strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="bf16-mixed"):
        t.fit(Classifier(), loader(dataset))


class Manual(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_without_a_private_step_is_refused(dataset) -> None:
    # Manual optimization is supported (tests/test_manual_optimization.py), but a training_step
    # that never steps a private optimizer would leave its Poisson batch unaccounted.
    with pytest.raises(RuntimeError, match="without stepping a private optimizer"):
        fit(Manual(), loader(dataset))


def test_closure_evaluated_twice_is_refused(dataset) -> None:
    with pytest.raises(RuntimeError, match="more than once"):
        fit(Classifier(optimizer="lbfgs"), loader(dataset))


def test_budget_without_dp_strategy_is_refused(dataset) -> None:
    t = trainer(max_steps=2, callbacks=[PrivacyBudget(epsilon=1.0, delta=1e-5)])
    with pytest.raises(ValueError, match="DPStrategy"):
        t.fit(Classifier(), loader(dataset))


def test_calibration_without_budget_is_refused(dataset) -> None:
    t = trainer(max_steps=2, strategy=DPStrategy())
    with pytest.raises(ValueError, match="no PrivacyBudget"):
        t.fit(Classifier(), loader(dataset))


def test_calibration_without_an_end_is_refused(dataset) -> None:
    t = trainer(max_epochs=-1, strategy=DPStrategy(), callbacks=[PrivacyBudget(epsilon=1.0, delta=1e-5)])
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        t.fit(Classifier(), loader(dataset))


def test_two_budgets_are_refused(dataset) -> None:
    # Lightning refuses two stateful callbacks with one state key: two ledgers cannot disagree.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `PrivacyBudget`"):
        t = trainer(max_steps=2, strategy=DPStrategy(),
                    callbacks=[PrivacyBudget(epsilon=1.0, delta=1e-5), PrivacyBudget(epsilon=2.0, delta=1e-5)])
        t.fit(Classifier(), loader(dataset))


def test_large_delta_warns(dataset) -> None:
    t = trainer(max_steps=2, strategy=DPStrategy(), callbacks=[PrivacyBudget(epsilon=1.0, delta=0.1)])
    with pytest.warns(UserWarning, match="not below 1/N"):
        t.fit(Classifier(), loader(dataset))


class ReturnsNone(Classifier):
    def training_step(self, batch, batch_idx):  # type: ignore[override]
        if batch_idx > 0:
            return None
        return super().training_step(batch, batch_idx)


def test_skipping_a_non_empty_batch_is_refused(dataset) -> None:
    with pytest.raises(RuntimeError, match="returned None on a non-empty batch"):
        fit(ReturnsNone(), loader(dataset), check_per_sample_grads=False)


def test_batch_not_from_the_poisson_sampler_is_refused(dataset) -> None:
    model = Classifier()
    t = fit(model, loader(dataset))
    with pytest.raises(RuntimeError, match="not Poisson-sampled"):
        t.strategy.training_step(next(iter(loader(dataset))), 0)


class Unstoppable(L.Callback):
    """Misbehaving user code: undoes every stop request."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = False


def test_a_step_past_the_budget_raises_even_if_the_stop_is_undone(dataset) -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5, accountant="rdp")
    t = trainer(max_epochs=50, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[budget, Unstoppable()])
    with pytest.raises(PrivacyBudgetExhausted, match="allows"):
        t.fit(Classifier(), loader(dataset))
    assert 0 < budget.steps == budget.allowed_steps < 400
    assert budget.epsilon_spent <= 3.0


# --------------------------------------------------------------------------- layers
class WithBatchNorm(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def test_batch_norm_is_refused_by_name(dataset) -> None:
    with pytest.raises(UnsupportedModuleError, match=r"net\.1 \(BatchNorm1d\).*replace_batch_norm=True"):
        fit(WithBatchNorm(), loader(dataset))


def test_batch_norm_replaced_in_the_module_the_trainer_trains(dataset) -> None:
    model = WithBatchNorm()
    t = fit(model, loader(dataset), replace_batch_norm=True)
    assert isinstance(model.net[1], nn.GroupNorm)
    assert t.lightning_module is model and t.global_step == 2
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.net[1].parameters()} <= opt_params


class ReloadsWithGroupNorm(WithBatchNorm):
    def on_load_checkpoint(self, checkpoint) -> None:
        replace_batch_norm(self)  # the one line: the checkpoint holds GroupNorm weights


def test_a_model_trained_with_replaced_batch_norm_reloads_with_one_line(dataset, tmp_path) -> None:
    model = ReloadsWithGroupNorm()
    t = fit(model, loader(dataset), replace_batch_norm=True)
    t.save_checkpoint(tmp_path / "model.ckpt")
    with pytest.raises(RuntimeError, match="running_mean"):  # without the line: BatchNorm keys missing
        WithBatchNorm.load_from_checkpoint(tmp_path / "model.ckpt")
    reloaded = ReloadsWithGroupNorm.load_from_checkpoint(tmp_path / "model.ckpt")
    assert isinstance(reloaded.net[1], nn.GroupNorm) and reloaded.net[1].num_groups == 1
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


class WithLSTM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 4, batch_first=True)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, _ = batch
        return self.rnn(x.unsqueeze(1))[0].pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layer_the_named_engine_cannot_handle_is_refused_before_any_step(dataset) -> None:
    model = WithLSTM()
    with pytest.raises(UnsupportedModuleError, match=r"rnn \(LSTM\).*engine='functorch'.*DPLSTM"):
        fit(model, loader(dataset), engine="hooks")
    assert model.calls == 0


# --------------------------------------------------------------------------- the per-sample gradient check
class TinyGPT(L.LightningModule):
    """nanoGPT's pattern: a position embedding looked up with torch.arange(T), no batch dim."""

    def __init__(self, vocab: int = 11, t: int = 8, d: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(t, d)
        self.head = nn.Linear(d, vocab)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        inp, tgt = x[:, :-1], x[:, 1:]
        T = inp.shape[1]
        h = self.tok(inp) + self.pos_emb(torch.arange(T, device=inp.device))
        logits = self.head(torch.tanh(h))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("seq_len", [5, 9])  # T == check batch size (4) + 1 -> silently wrong; else crash
def test_opacus_position_embedding_bug_is_caught(seq_len: int) -> None:
    tokens = torch.randint(0, 11, (64, seq_len))
    dl = DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8, shuffle=True)
    model = TinyGPT(t=seq_len)
    with pytest.raises(PerSampleGradientMismatch, match="pos_emb"):
        fit(model, dl, engine="hooks")


class SummedLoss(Classifier):
    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y, reduction="sum")


def test_summed_loss_read_as_mean_is_caught_with_the_fix(dataset) -> None:
    with pytest.raises(PerSampleGradientMismatch, match="loss_reduction='sum'"):
        fit(SummedLoss(), loader(dataset), engine="hooks")


def test_summed_loss_trains_with_loss_reduction_sum(dataset) -> None:
    assert fit(SummedLoss(), loader(dataset), loss_reduction="sum").global_step == 2


class RawParameter(Classifier):
    """A parameter used directly, outside any layer Opacus hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) * self.scale, y)


def test_parameter_outside_a_layer_is_caught(dataset) -> None:
    with pytest.raises(PerSampleGradientMismatch, match="scale"):
        fit(RawParameter(), loader(dataset), engine="hooks")


def test_parameter_outside_a_layer_fails_at_the_first_step_when_the_check_is_off(dataset) -> None:
    from lightning_dp.mechanism.grads.engine import PerSampleGradientError

    with pytest.warns(UserWarning, match="check_per_sample_grads=False"), pytest.raises(
        PerSampleGradientError, match="scale"
    ):
        fit(RawParameter(), loader(dataset), engine="hooks", check_per_sample_grads=False)


class WithDropout(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))


def test_dropout_models_pass_the_check(dataset) -> None:
    assert fit(WithDropout(), loader(dataset)).global_step == 2


class LowersNoise(L.Callback):
    """User code that lowers the noise mid-run: the budget must replan, not keep the old count."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            trainer.strategy.noise_multiplier = 0.3


def test_noise_lowered_mid_run_replans_and_stops_cleanly(dataset) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=1e-5, accountant="rdp")
    t = trainer(max_epochs=20, strategy=DPStrategy(noise_multiplier=2.0), callbacks=[LowersNoise(), budget])
    t.fit(Classifier(), loader(dataset))
    assert budget.history.segments == [(2.0, 0.125, 2)]  # one step at 0.3 would overspend
    assert t.global_step == budget.steps == 2
    assert budget.epsilon_spent <= 5.0


def test_noise_lowered_after_the_budget_looked_is_refused_at_the_step(dataset) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=1e-5, accountant="rdp")
    t = trainer(max_epochs=20, strategy=DPStrategy(noise_multiplier=2.0), callbacks=[budget, LowersNoise()])
    with pytest.raises(PrivacyBudgetExhausted, match="lowered the noise"):
        t.fit(Classifier(), loader(dataset))
    assert budget.history.segments == [(2.0, 0.125, 2)]
    assert budget.epsilon_spent <= 5.0


class PaddedEmbedding(Classifier):
    """An embedding with padding_idx: Opacus's embedding grad sampler gives the padding row a
    per-example gradient that autograd never does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        ids = (x.abs() * 3).long().clamp(max=9)  # many zeros: the padding index
        return nn.functional.cross_entropy(self.net(self.emb(ids).mean(dim=1)), y)


def test_opacus_padding_idx_bug_is_caught_and_auto_moves_on(dataset) -> None:
    with pytest.raises(PerSampleGradientMismatch, match="emb.weight"):
        fit(PaddedEmbedding(), loader(dataset), engine="hooks")
    t = fit(PaddedEmbedding(), loader(dataset))
    assert t.strategy.engine.name == "ghost"


class Augmented(torch.utils.data.Dataset):
    """Random augmentation inside __getitem__: every fetch of an example differs."""

    def __init__(self) -> None:
        self.base = make_dataset(n=64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def test_random_augmentation_in_the_dataset_passes_the_check() -> None:
    assert fit(Classifier(), DataLoader(Augmented(), batch_size=8, shuffle=True)).global_step == 2
