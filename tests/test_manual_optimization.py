"""Manual optimization under DPStrategy: a GAN whose discriminator is private and generator public."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import clipped_sum, loader, make_dataset, pld_epsilon, trainer
from lightning_dp import DPDDPStrategy, DPStrategy, PrivacyBudget
from lightning_dp.core.accounting import compute_epsilon
from lightning_dp.mechanism.grads.check import PerSampleGradientMismatch

DELTA = 1e-5
D_IN, Z = 6, 4
bce = nn.functional.binary_cross_entropy_with_logits


def d_loss(d: nn.Module, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per example: real row i scored as real plus fake row i scored as fake."""
    real = bce(d(x).squeeze(1), torch.ones(len(x)), reduction="none")
    return real + bce(d(fake).squeeze(1), torch.zeros(len(fake)), reduction="none")


def g_loss(d: nn.Module, g: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return bce(d(g(z)).squeeze(1), torch.ones(len(z)))


def snap(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class GAN(L.LightningModule):
    """A tiny GAN on 6-d vectors. The discriminator's loss is per example: real row i paired
    with fake row i. The generator draws a fixed number of fakes (never the batch's size).
    Records each step's inputs and parameters so tests can recompute the updates."""

    def __init__(self, hidden: int = 8, lr: float = 1.0, zero_d_loss: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.G = nn.Linear(Z, D_IN)
        self.D = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.lr, self.zero_d_loss = lr, zero_d_loss
        self.records: list[dict[str, Any]] = []

    def d_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return d_loss(self.D, x, fake)

    def g_loss(self, z: torch.Tensor) -> torch.Tensor:
        return g_loss(self.D, self.G, z)

    def discriminator_step(self, x: torch.Tensor, rec: dict[str, Any]) -> None:
        opt_d = self.optimizers()[1]
        fake = self.G(torch.randn(len(x), Z)).detach()
        rec.update(x=x.detach().clone(), fake=fake, d0=snap(self.D))
        loss = self.d_loss(x, fake)
        self.manual_backward(loss * 0 if self.zero_d_loss else loss)
        opt_d.step()  # no zero_grad: the generator's backward below leaves D grads behind
        rec["d1"] = snap(self.D)

    def generator_step(self, rec: dict[str, Any]) -> None:
        opt_g = self.optimizers()[0]
        z = torch.randn(8, Z)
        rec.update(z=z, g0=snap(self.G), d_at_g=snap(self.D))
        self.manual_backward(self.g_loss(z))
        opt_g.step()
        opt_g.zero_grad()
        rec["g1"] = snap(self.G)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        rec: dict[str, Any] = {}
        self.discriminator_step(x, rec)
        self.generator_step(rec)
        self.records.append(rec)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.G.parameters(), lr=self.lr), torch.optim.SGD(self.D.parameters(), lr=self.lr)]


def fit(model: L.LightningModule, n: int = 64, batch_size: int = 8, callbacks: Any = (), **kw: Any) -> L.Trainer:
    strategy_kw = {k: kw.pop(k) for k in list(kw) if k in ("noise_multiplier", "max_grad_norm", "private_optimizers", "engine",
                                                            "max_physical_batch_size", "check_per_sample_grads")}
    strategy_kw.setdefault("noise_multiplier", 1.0)
    strategy_kw.setdefault("private_optimizers", [1])
    kw.setdefault("max_steps", 4)
    t = trainer(strategy=DPStrategy(**strategy_kw), callbacks=list(callbacks), **kw)
    t.fit(model, loader(make_dataset(n=n, d=D_IN), batch_size=batch_size))
    return t


def at(module: nn.Module, params: list[torch.Tensor]) -> nn.Module:
    """A copy of ``module`` with the given parameter values."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        for p, v in zip(m.parameters(), params):
            p.copy_(v)
    return m


# --------------------------------------------------------------------------- the mechanism
def test_discriminator_update_equals_the_exact_dp_update() -> None:
    c, lr = 0.3, 1.0
    model = GAN(lr=lr)
    t = fit(model, noise_multiplier=0.0, max_grad_norm=c, max_steps=6)  # 3 batches, 2 optimizer steps each
    assert len(model.records) == t.strategy.history.steps == 3
    clipped_some = False
    for rec in model.records:
        d = at(model.D, rec["d0"])
        grads = []
        for i in range(len(rec["x"])):  # brute force: one backward pass per example
            loss = d_loss(d, rec["x"][i : i + 1], rec["fake"][i : i + 1]).sum()
            grads.append([g.detach() for g in torch.autograd.grad(loss, list(d.parameters()))])
        clipped_some |= any(torch.sqrt(sum((g**2).sum() for g in gs)) > c for gs in grads)
        expected = [p0 - lr * s / 8 for p0, s in zip(rec["d0"], clipped_sum(grads, c, rec["d0"]))]  # / (q N) = 8
        for got, want in zip(rec["d1"], expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert clipped_some  # the clipping was exercised, not just the sum
    # The generator's backward (through D) left D grads behind before the 2nd and 3rd updates;
    # those were exact too: the release overwrites param.grad.


def test_discriminator_noise_has_the_calibrated_variance() -> None:
    sigma, c = 2.0, 0.5
    model = GAN(hidden=32, zero_d_loss=True)
    fit(model, noise_multiplier=sigma, max_grad_norm=c, max_steps=8)
    # Zero per-example gradients: the update is noise only, -lr * N(0, (sigma C)^2) / (q N).
    noise = torch.cat([torch.cat([(a - b).flatten() for a, b in zip(r["d0"], r["d1"])]) * 8 for r in model.records])
    assert noise.numel() == 4 * 257
    assert stats.kstest((noise / (sigma * c)).numpy(), "norm").pvalue > 1e-3
    assert abs(noise.std().item() / (sigma * c) - 1) < 0.1


def test_generator_step_adds_no_noise_and_spends_nothing() -> None:
    model = GAN(lr=0.5)
    t = fit(model, noise_multiplier=5.0, max_steps=8)
    assert t.global_step == 8  # Lightning counts both optimizers' steps ...
    assert t.strategy.history.segments == [(5.0, 8 / 64, 4)]  # ... the ledger only the discriminator's
    for rec in model.records:
        d, g = at(model.D, rec["d_at_g"]), at(model.G, rec["g0"])
        plain = torch.autograd.grad(g_loss(d, g, rec["z"]), list(g.parameters()))
        for got, p0, g in zip(rec["g1"], rec["g0"], plain):  # plain SGD on the public loss: no noise
            torch.testing.assert_close(got, p0 - 0.5 * g, atol=1e-6, rtol=1e-5)


def test_budget_stops_a_manual_run_before_overspending() -> None:
    sigma, q, target = 2.0, 8 / 64, 1.0  # about 10 steps
    budget = PrivacyBudget(epsilon=target, delta=DELTA)
    t = fit(GAN(), callbacks=[budget], noise_multiplier=sigma, max_steps=-1, max_epochs=100)
    steps = budget.steps
    assert 0 < steps < 100 * 8 and t.global_step == 2 * steps  # stopped, every batch one private step
    assert budget.epsilon_spent <= target
    assert compute_epsilon([(sigma, q, steps + 1)], DELTA) > target  # one more would overspend
    assert pld_epsilon([(sigma, q, steps)], DELTA) <= target + 0.01  # the independent accountant agrees
    assert "stopping after" in budget.stopped_reason


def test_calibration_plans_batches_not_optimizer_steps() -> None:
    target = 2.0
    budget = PrivacyBudget(epsilon=target, delta=DELTA)
    t = fit(GAN(), callbacks=[budget], noise_multiplier=None, max_steps=-1, max_epochs=2)
    assert budget.steps == 16 and t.global_step == 32  # the whole plan ran: 2 epochs of 8 batches
    assert 0.9 * target <= budget.epsilon_spent <= target  # planned for 16 private steps, not 32
    assert pld_epsilon([(budget.noise_multiplier, 8 / 64, 16)], DELTA) <= target + 0.01
    assert "the planned run ends" in budget.stopped_reason


def test_resuming_a_manual_run_keeps_its_ledger(tmp_path) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=DELTA, accountant="rdp")
    t = fit(GAN(), callbacks=[budget], max_steps=6)
    t.save_checkpoint(tmp_path / "gan.ckpt")  # global_step 6, 3 private steps
    resumed = PrivacyBudget(epsilon=5.0, delta=DELTA, accountant="rdp")
    t2 = trainer(max_steps=10, strategy=DPStrategy(noise_multiplier=1.0, private_optimizers=[1]), callbacks=[resumed])
    t2.fit(GAN(), loader(make_dataset(n=64, d=D_IN), batch_size=8), ckpt_path=tmp_path / "gan.ckpt")
    assert resumed.steps == 5 and t2.global_step == 10


class CountingGAN(GAN):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.sizes.append(len(x))
        assert x.shape[1:] == (D_IN,) and y.shape == (len(x),)
        super().training_step(batch, batch_idx)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_empty_draws_still_take_the_private_step(sigma: float) -> None:
    model = CountingGAN()
    t = fit(model, noise_multiplier=sigma, batch_size=1, max_steps=24)  # q = 1/64: about 1 draw in 3 is empty
    assert len(model.sizes) == 12 == t.strategy.history.steps  # training_step ran on every draw, empty ones too
    empty = [r for r, n in zip(model.records, model.sizes) if n == 0]
    assert empty
    for rec in empty:
        moved = any(not torch.equal(a, b) for a, b in zip(rec["d0"], rec["d1"]))
        assert moved == (sigma > 0)  # noise only, and exactly nothing without noise
        assert any(not torch.equal(a, b) for a, b in zip(rec["g0"], rec["g1"]))  # the generator steps as usual


# --------------------------------------------------------------------------- refusals
class ScalarD(GAN):
    def d_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return super().d_loss(x, fake).mean()


class WrongShape(GAN):
    def d_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return super().d_loss(x, fake).repeat(2)


class FakesOnlyStep(GAN):
    def discriminator_step(self, x: torch.Tensor, rec: dict[str, Any]) -> None:
        self.manual_backward(bce(self.D(torch.randn(4, D_IN)).squeeze(1), torch.zeros(4)))  # a public loss
        self.optimizers()[1].step()


class TwoCriticSteps(GAN):
    def discriminator_step(self, x: torch.Tensor, rec: dict[str, Any]) -> None:
        for _ in range(2):  # n_critic = 2 on one batch
            super().discriminator_step(x, rec)


class NoPrivateStep(GAN):
    def discriminator_step(self, x: torch.Tensor, rec: dict[str, Any]) -> None:
        pass


class BackwardAfterStep(GAN):
    def discriminator_step(self, x: torch.Tensor, rec: dict[str, Any]) -> None:
        super().discriminator_step(x, rec)
        self.manual_backward(self.d_loss(x, torch.zeros_like(x)))


class BatchMean(GAN):
    def d_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return super().d_loss(x - x.mean(0), fake)  # mixes the examples of the batch


class Detached(GAN):
    def d_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return super().d_loss(x, fake).detach()


class BackwardInHook(GAN):
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.manual_backward(self.g_loss(torch.randn(2, Z)))


class SharedParams(GAN):
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.parameters(), lr=1.0), torch.optim.SGD(self.D.parameters(), lr=1.0)]


@pytest.mark.parametrize(
    "model, kw, error, match",
    [
        (ScalarD(), {}, ValueError, "scalar loss .* depends on the training batch"),
        (WrongShape(), {}, ValueError, r"loss of shape \((\d+),\).* has \d+ examples.*reduce it with .mean"),
        (FakesOnlyStep(), {}, RuntimeError, "stepped without a per-example loss"),
        (TwoCriticSteps(), {}, RuntimeError, "already stepped on this Poisson batch.*n_critic"),
        (GAN(), {"private_optimizers": None}, RuntimeError, "second private optimizer step.*private_optimizers"),
        (NoPrivateStep(), {}, RuntimeError, "without stepping a private optimizer"),
        (BackwardAfterStep(), {}, RuntimeError, "after the private optimizer already stepped"),
        (BatchMean(), {}, PerSampleGradientMismatch, "depends on example"),
        (Detached(), {}, ValueError, "does not require grad"),
        (BackwardInHook(), {}, RuntimeError, "outside training_step"),
        (SharedParams(), {}, ValueError, "Optimizer 0 is public but shares parameters"),
        (GAN(), {"private_optimizers": [2]}, ValueError, r"names optimizer\(s\) \[2\]"),
        (GAN(), {"max_physical_batch_size": 4}, ValueError, "max_physical_batch_size.*not supported with manual"),
    ],
)
def test_unsafe_manual_optimization_is_refused(model: GAN, kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit(model, **kw)
    if error is not ValueError or "private_optimizers" in kw or "max_physical" in kw:
        return
    assert not model.records or "d1" not in model.records[-1]  # refused before any unclipped step


class LeakyGenerator(GAN):
    """The generator's public loss reads the batch through ``leak``; ``backward`` runs it."""

    def __init__(self, leak: str, backward: str) -> None:
        super().__init__()
        self.leak, self.backward_kind = leak, backward
        self.register_buffer("running", torch.zeros(Z))

    def leaked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.leak == "labels":  # a conditional generator fed the batch's real (integer) labels
            return nn.functional.one_hot(y, Z).float().mean(0)
        if self.leak == "detached":
            return x.detach()[:, :Z].mean(0)
        if self.leak == "no_grad":
            with torch.no_grad():
                return x[:, :Z].mean(0)
        if self.leak == "buffer":  # statistics of the batch kept in a buffer written in place
            self.running.mul_(0.9).add_(0.1 * x[:, :Z].mean(0))
            return self.running
        raise AssertionError(self.leak)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        rec: dict[str, Any] = {}
        self.discriminator_step(x, rec)
        self.records.append(rec)
        z = torch.randn(8, Z) + self.leaked(x, y)
        loss = self.g_loss(z)
        if self.backward_kind == "manual_backward":
            self.manual_backward(loss)
        elif self.backward_kind == "inputs":  # keeps the gradient away from the batch's leaves
            self.manual_backward(loss, inputs=list(self.G.parameters()))
        else:
            loss.backward()
        self.optimizers()[0].step()
        rec["g1"] = snap(self.G)


@pytest.mark.parametrize("backward", ["manual_backward", "inputs", "loss.backward"])
@pytest.mark.parametrize("leak", ["labels", "detached", "no_grad", "buffer"])
def test_a_public_loss_that_reads_the_batch_is_refused_before_it_writes_a_gradient(leak: str, backward: str) -> None:
    model = LeakyGenerator(leak, backward)
    g0 = snap(model.G)
    with pytest.raises(ValueError, match="depends on the training batch"):
        fit(model)
    assert all(p.grad is None for p in model.G.parameters())  # refused before the backward ran
    assert all(torch.equal(a, b) for a, b in zip(g0, snap(model.G)))
    assert "g1" not in model.records[-1]


class StepsBeforeItsClosure(torch.optim.SGD):
    """An optimizer that updates with whatever .grad holds, then evaluates the closure."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        out = super().step()
        if closure is not None:
            closure()
        return out


class StepFirstGAN(GAN):
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.G.parameters(), lr=self.lr), StepsBeforeItsClosure(self.D.parameters(), lr=self.lr)]


def test_an_optimizer_that_steps_before_its_closure_still_takes_only_the_dp_update() -> None:
    c = 0.3
    model = StepFirstGAN()
    fit(model, noise_multiplier=0.0, max_grad_norm=c, max_steps=6)  # the generator leaves D grads behind
    for rec in model.records:
        d = at(model.D, rec["d0"])
        grads = [
            [g.detach() for g in torch.autograd.grad(d_loss(d, rec["x"][i : i + 1], rec["fake"][i : i + 1]).sum(),
                                                     list(d.parameters()))]
            for i in range(len(rec["x"]))
        ]
        expected = [p0 - s / 8 for p0, s in zip(rec["d0"], clipped_sum(grads, c, rec["d0"]))]
        for got, want in zip(rec["d1"], expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_the_report_records_the_manual_check_only_once_it_ran() -> None:
    model = GAN()
    t = fit(model, n=64, batch_size=8)
    check = t.strategy.grad_check
    assert check["verified"] and check["examples"] == 4 and check["cross_talk_checked"]
    assert check["worst_relative_error"] < 1e-5
    # One example, q = 1: every draw holds exactly that example, never two, so the check never ran.
    tiny = fit(GAN(), n=1, batch_size=1, max_steps=4, noise_multiplier=1.0)
    assert [len(r["x"]) for r in tiny.lightning_module.records] == [1, 1]
    assert not tiny.strategy.grad_check["verified"] and tiny.strategy.grad_check["examples"] == 0


@pytest.mark.parametrize("value", [[], [-1], [0, 0], "0", [True], [0.5]])
def test_private_optimizers_argument_is_validated(value: Any) -> None:
    with pytest.raises(ValueError, match="private_optimizers"):
        DPStrategy(private_optimizers=value)


def test_private_optimizers_with_automatic_optimization_is_refused() -> None:
    from conftest import Classifier

    t = trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, private_optimizers=[0]))
    with pytest.raises(ValueError, match="applies to manual optimization"):
        t.fit(Classifier(), loader(make_dataset()))


def test_manual_optimization_with_ddp_is_refused() -> None:
    t = trainer(max_steps=1, devices=1, strategy=DPDDPStrategy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="DPDDPStrategy does not support manual optimization"):
        t.fit(GAN(), loader(make_dataset(d=D_IN)))


class Record:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


class Records(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> Record:
        return Record(torch.randn(D_IN))


def test_batch_without_an_empty_form_is_refused() -> None:
    t = trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, private_optimizers=[1]))
    with pytest.raises(TypeError, match="empty batch of an empty Poisson draw cannot be built"):
        t.fit(GAN(), DataLoader(Records(), batch_size=4, collate_fn=lambda items: items[0]))


def test_per_sample_gradient_options_of_automatic_optimization_warn_that_they_do_nothing() -> None:
    with pytest.warns(UserWarning, match=r"engine='hooks'.*no effect with manual optimization"):
        fit(GAN(), engine="hooks", max_steps=2)
