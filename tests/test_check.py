"""The start-of-fit check can fail: on NaN references, on losses that mix examples (for every
engine, ``auto`` included), on cross-talk inside an engine, and on non-finite engine output."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy
from lightning_dp.mechanism.grads.check import PerSampleGradientMismatch, check_per_sample_grads
from lightning_dp.mechanism.grads.registry import make_engine
from lightning_dp.mechanism.grads.check import LossNotPerExample, no_dropout
from lightning_dp.mechanism.grads.engine import Materialized

ENGINES = ["auto", "ghost", "hooks", "functorch", "loop"]


def fit(model: Any, dl: Any, **kw: Any):
    kw.setdefault("noise_multiplier", 0.0)
    t = trainer(max_steps=1, strategy=DPStrategy(**kw))
    t.fit(model, dl)
    return t


class StandardisedByBatch(Classifier):
    """Standardises the inputs with the batch's statistics: the std of one example is NaN, so a
    one-example reference is NaN, which an `err > tol` comparison used to let through."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        x = (x - x.mean(0)) / x.std(0)
        return nn.functional.cross_entropy(self.net(x), y)


class InfoNCE(Classifier):
    """A contrastive loss: each example's term depends on every other example. On a batch of
    one it is log(1) = 0, so engines that run each example alone (functorch, loop) computed a
    zero gradient and trained on pure noise."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, _ = batch
        z = nn.functional.normalize(self.net(x), dim=1)
        return nn.functional.cross_entropy(z @ z.t() / 0.1, torch.arange(len(x)))


class TokenNormalised(Classifier):
    """Hugging Face's causal-LM loss in miniature: token losses summed over the batch and
    divided by the batch's number of real tokens, so an example's weight depends on the others'
    lengths."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y, mask = batch  # mask: which of an example's 6 "tokens" are real
        logits = self.net(x).unsqueeze(1).expand(-1, 6, -1)
        token_losses = nn.functional.cross_entropy(
            logits.reshape(-1, 3), y.repeat_interleave(6), reduction="none"
        ).view(-1, 6)
        return (token_losses * mask).sum() / mask.sum()


def token_dataset(n: int = 64) -> TensorDataset:
    base = make_dataset(n=n)
    lengths = torch.randint(1, 7, (n,), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return TensorDataset(base.tensors[0], base.tensors[1], mask)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_statistics_are_refused_by_every_engine(engine: str) -> None:
    model = StandardisedByBatch()
    with pytest.raises(LossNotPerExample, match=r"statistics of the batch.*std"):
        fit(model, loader(make_dataset()), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_contrastive_loss_is_refused_by_every_engine(engine: str) -> None:
    with pytest.raises(LossNotPerExample, match="mixes examples"):
        fit(InfoNCE(), loader(make_dataset()), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_normalised_by_the_batch_token_count_is_refused_with_the_fix(engine: str) -> None:
    with pytest.raises(LossNotPerExample, match="causal_lm_loss"):
        fit(TokenNormalised(), DataLoader(token_dataset(), batch_size=8, shuffle=True), engine=engine)


def test_a_refused_loss_is_the_main_message_not_a_list_of_passed_over_engines() -> None:
    with pytest.raises(LossNotPerExample) as info:
        fit(InfoNCE(), loader(make_dataset()))
    assert "passed over" not in str(info.value) and "No per-sample gradient engine" not in str(info.value)


class CentredByBatch(Classifier):
    """Centres the inputs on the batch mean: mixes examples, but invisibly on identical ones."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return nn.functional.cross_entropy(self.net(x - x.mean(0) + 1.0), y)


def test_a_class_sorted_dataset_does_not_hide_a_mixing_loss() -> None:
    # The first 32 examples are one repeated example (as a sorted dataset's first class can look
    # alike); a check on its first few examples sees x - mean(x) = 0 for the batch and for each
    # example alone, and passed. The check draws across the whole set.
    ds = make_dataset(n=64)
    x, y = ds.tensors
    x[:32], y[:32] = x[0], y[0]
    for engine in ("ghost", "functorch"):
        with pytest.raises(LossNotPerExample, match="mixes examples"):
            fit(CentredByBatch(), loader(TensorDataset(x, y)), engine=engine)


class MixesAtSevenExamples(Classifier):
    """Mixes examples only on batches of 7: the one-example passes and the batch of 8 look right,
    and only the drop-one comparison (7 examples) sees it."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        if len(x) == 7:
            x = x + x.mean(0)
        return nn.functional.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("engine", ["ghost", "hooks"])
def test_cross_talk_inside_the_engine_is_caught_by_dropping_an_example(engine: str) -> None:
    with pytest.raises(PerSampleGradientMismatch, match="cross-talk"):
        fit(MixesAtSevenExamples(), loader(make_dataset()), engine=engine)


def test_per_example_losses_pass_with_every_engine() -> None:
    for engine in ENGINES:
        t = fit(Classifier(), loader(make_dataset()), engine=engine)
        check = t.strategy.grad_check
        assert check["verified"] and check["examples"] == 8 and check["cross_talk_checked"]
        assert 0.0 <= check["worst_relative_error"] < 1e-3


# --------------------------------------------------------------------------- the comparison itself
def _setup(n: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    params = list(model.parameters())

    def batch_of(positions):
        positions = list(positions)
        return x[positions], y[positions]

    def step(batch):
        xb, yb = batch
        return None, nn.functional.cross_entropy(model(xb), yb)

    return model, params, batch_of, step


class CorruptingEngine:
    """Wraps a real engine and writes NaN into example 1's per-example gradient: the check must
    fail, and never report a relative error of 0.0 for it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = "corrupting"

    def compute(self, step, batch, params, batch_size, loss_reduction):
        output, loss, grads = self.inner.compute(step, batch, params, batch_size, loss_reduction)
        eye = torch.eye(batch_size)
        rows = [grads.weighted_sum(eye[k]) for k in range(batch_size)]  # per example, per parameter
        per_param = [torch.stack([rows[k][j] for k in range(batch_size)]) for j in range(len(params))]
        if batch_size > 1:
            per_param[0][1] = float("nan")
        return output, loss, Materialized(per_param, batch_size)

    def disabled(self):
        return self.inner.disabled()


def test_a_nan_per_example_gradient_fails_the_comparison() -> None:
    model, params, batch_of, step = _setup()
    inner = make_engine("loop")
    inner.attach(model)
    with pytest.raises(PerSampleGradientMismatch, match=r"0\.weight \(relative error inf\)"):
        check_per_sample_grads(CorruptingEngine(inner), model, params, batch_of, step, range(4), "mean")
    # The same engine without the corruption passes, with a finite error.
    assert check_per_sample_grads(inner, model, params, batch_of, step, range(4), "mean") < 1e-5


def test_functional_and_attention_dropout_are_off_during_the_check() -> None:
    x = torch.ones(2, 4, 8)
    with no_dropout(nn.Module()):
        assert torch.equal(nn.functional.dropout(x, 0.5, training=True), x)
        out = nn.functional.scaled_dot_product_attention(x, x, x, dropout_p=0.9)
        ref = nn.functional.scaled_dot_product_attention(x, x, x)
        assert torch.allclose(out, ref)
    assert not torch.equal(nn.functional.dropout(x, 0.5, training=True), x)  # back on afterwards


# --------------------------------------------------------------------------- review findings
class HandlesMissingValues(Classifier):
    """Tabular data with a NaN (a missing value) in every row, which the model fills in."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return nn.functional.cross_entropy(self.net(torch.nan_to_num(x)), y)


class CentredWithMissingValues(HandlesMissingValues):
    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        x = torch.nan_to_num(x)
        return nn.functional.cross_entropy(self.net(x - x.mean(0)), y)


def missing_values() -> TensorDataset:
    x, y = make_dataset(n=64).tensors
    x = x.clone()
    x[:, 3] = math.nan
    return TensorDataset(x, y)


def test_data_with_a_nan_in_every_row_is_checked_not_skipped() -> None:
    # The check picks its examples by whether their loss is finite, not their raw data: a model
    # that handles missing values is verified on 8 examples, and a mixing loss is still refused.
    t = fit(HandlesMissingValues(), loader(missing_values()))
    assert t.strategy.grad_check["verified"] and t.strategy.grad_check["examples"] == 8
    with pytest.raises(LossNotPerExample, match="mixes examples"):
        fit(CentredWithMissingValues(), loader(missing_values()))


def test_a_dataset_with_no_finite_loss_is_refused_not_trained_unchecked() -> None:
    x, y = make_dataset(n=64).tensors
    with pytest.raises(LossNotPerExample, match="needs 2 training examples whose loss is finite"):
        fit(Classifier(), loader(TensorDataset(torch.full_like(x, math.nan), y)))


class MixesAfterWarmUp(Classifier):
    """A term that mixes examples switched on after a warm-up, as a schedule would."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        if self.trainer.global_step >= 3:
            x = x - x.mean(0)
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_loss_that_starts_mixing_mid_run_is_caught_by_a_spot_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_dp.lightning.private_step as private_step

    monkeypatch.setattr(private_step, "SPOT_CHECK_EVERY", 1)  # a spot check at every step
    t = trainer(max_steps=10, strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.raises(LossNotPerExample, match="At step 3 .*spot check"):
        t.fit(MixesAfterWarmUp(), loader(make_dataset()))
    assert t.strategy.history.steps == 3  # the steps before the switch


def test_spot_checks_run_in_a_long_run_and_pass_on_a_per_example_loss() -> None:
    t = trainer(max_steps=300, strategy=DPStrategy(noise_multiplier=1.0))
    t.fit(Classifier(), loader(make_dataset()))
    assert t.strategy.grad_check["spot_checks"] >= 1  # about 300 / 64


class RunningMean(Classifier):
    """Keeps a running mean of the inputs in a buffer, updated in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        self.mean.mul_(0.9).add_(0.1 * x.mean(0).detach())
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_buffer_updated_from_the_data_in_training_step_is_refused() -> None:
    with pytest.raises(LossNotPerExample, match="buffer.*mean.*without clipping or noise"):
        fit(RunningMean(), loader(make_dataset()))


def test_a_user_built_poisson_loader_is_refused() -> None:
    from lightning_dp.mechanism.sampling import poisson_dataloader

    with pytest.raises(TypeError, match="already Poisson-sampled"):
        fit(Classifier(), poisson_dataloader(loader(make_dataset())))


class WideClassifier(Classifier):
    """Products long enough that bf16 rounding shows (a 256-wide hidden layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))


@pytest.mark.parametrize("engine", ["auto", "ghost", "loop"])
def test_the_check_passes_under_the_matmul_precision_lightning_suggests(engine: str) -> None:
    """``torch.set_float32_matmul_precision("medium")``, which Lightning suggests on GPUs with
    tensor cores, runs float32 products in bf16 on CPUs with AMX (TF32 on CUDA): the reference
    and every engine then differed by ~2e-3 and each engine was refused as "wrong for this
    model". The check verifies how gradients are split by example, in exact arithmetic. On a CPU
    without AMX the setting changes nothing here and this test cannot fail."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        t = fit(WideClassifier(), loader(make_dataset(n=64), 16), engine=engine, max_grad_norm=1.0)
        assert t.strategy.grad_check["engine"] in ("ghost", "loop")
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting, kept for training
    finally:
        torch.set_float32_matmul_precision(precision)
