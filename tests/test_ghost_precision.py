"""Ghost clipping must release each example's clipped contribution at the precision its norm
bound assumed. An example whose positions cancel has a tiny exact gradient, so its clip factor
is huge; if the clipped sum ``(c g)^T a`` is then computed in bf16 (autocast) or float32 with
terms of 2^25, the rounding of the huge terms becomes the released contribution: thousands of
``C`` where DP-SGD promises ``C``. Each test measures the sensitivity itself: the released sum
with and without the crafted example (noise off), against ``C``."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import pytest
import torch
from conftest import trainer
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_dp import DPStrategy
from lightning_dp.mechanism.gaussian import GaussianMechanism
from lightning_dp.mechanism.grads.ghost_grads import GhostGrads

C = 1.0


def _released(grads: GhostGrads, shape: torch.Size) -> float:
    """The norm of what a noiseless step releases for these per-example gradients."""
    w = nn.Parameter(torch.zeros(shape))
    mech = GaussianMechanism([w], max_grad_norm=C)
    mech.add(grads)
    mech.release(noise_multiplier=0.0, expected_batch_size=1.0)
    assert w.grad is not None
    return float(w.grad.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("positions", "width"), [(12, 64), (256, 256)])  # the float32 and float64 Gram routes
def test_a_cancelling_linear_example_contributes_at_most_c(dtype: torch.dtype, positions: int, width: int) -> None:
    rng = random.Random(positions)
    worst = 0.0
    for _ in range(40):
        big, e = 2.0 ** rng.randint(0, 20), rng.randint(1, 127) * 2.0**-7
        a, g = torch.zeros(1, positions, width), torch.zeros(1, positions, width)
        for r in range(positions // 3):  # a = (M, M, -2M), g = (1+e, 1-e, 1): exact gradient 0
            a[0, 3 * r : 3 * r + 3, 0] = torch.tensor([big, big, -2 * big])
            g[0, 3 * r : 3 * r + 3, 0] = torch.tensor([1 + e, 1 - e, 1.0])
        g = g * 2.0 ** rng.randint(-10, 10)
        grads = GhostGrads(1, 1)
        grads.add_linear(0, a.to(dtype), g.to(dtype), False, torch.Size([width, width]))
        worst = max(worst, _released(grads, torch.Size([width, width])))
    assert worst <= C * (1 + 1e-3)


@pytest.mark.parametrize(
    ("a_value", "g_value", "positions", "d_in", "d_out"),
    [(2e17, 5e-24, 256, 16, 64), (4e18, (1.49 * 2.0**-149) ** 0.5, 64, 16, 256)],
    ids=["squares-underflow", "products-underflow"],
)
def test_gradients_in_float32s_subnormal_range_are_bounded_and_clipped(
    a_value: float, g_value: float, positions: int, d_in: int, d_out: int
) -> None:
    # Output gradients of ~1e-23 against inputs of ~1e18 (a crafted record): the gradient is
    # ordinary, but float32 squares and products of the small factor fall below the smallest
    # normal number and lose up to a third (or all) of their value, which relative rounding
    # bounds do not cover. The bound must still be an upper bound and the release at most C.
    a, g = torch.full((1, positions, d_in), a_value), torch.full((1, positions, d_out), g_value)
    true = float(torch.einsum("nli,nlo->noi", a.double(), g.double()).norm())
    grads = GhostGrads(1, 1)
    grads.add_linear(0, a, g, False, torch.Size([d_out, d_in]))
    assert float(grads.sq_norms(torch.float64)[0]) >= true**2
    small = GhostGrads(1, 1)
    small.add_linear(0, a * (10 * C / true), g, False, torch.Size([d_out, d_in]))  # the true norm is 10 C
    assert _released(small, torch.Size([d_out, d_in])) <= C * (1 + 1e-6)


def test_float32_terms_of_two_to_the_25_do_not_round_into_the_release() -> None:
    # (2^25, +1 x 127, -2^25, -1 x 127): float32 accumulation keeps the -1s and drops the +1s.
    k = 127
    a = torch.zeros(1, 2 * k + 2, 256)
    a[0, :, 0] = torch.tensor([2.0**25] + [1.0] * k + [-(2.0**25)] + [-1.0] * k)
    g = torch.zeros_like(a)
    g[0, :, 0] = 4096.0
    grads = GhostGrads(1, 1)
    grads.add_linear(0, a, g, False, torch.Size([256, 256]))
    assert _released(grads, torch.Size([256, 256])) <= C * (1 + 1e-3)


def test_a_cancelling_embedding_example_contributes_at_most_c() -> None:
    # One token at every position, output gradients (2^23, +1 x 255, -2^23, -1 x 255): exact
    # gradient 0, and float32's index_add_ keeps the -1s and drops the +1s.
    k, dim = 255, 512
    ids = torch.full((1, 2 * k + 2), 7)
    g = torch.zeros(1, 2 * k + 2, dim)
    g[0, :, 0] = torch.tensor([2.0**23] + [1.0] * k + [-(2.0**23)] + [-1.0] * k)
    grads = GhostGrads(1, 1)
    grads.add_embedding(0, ids, g, 100)
    assert _released(grads, torch.Size([100, dim])) <= C * (1 + 1e-3)


class _FrozenFeaturesHead(L.LightningModule):
    """A trainable per-position head on frozen features: under bf16 autocast both its input and
    its output gradient are bf16."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Linear(width, width, bias=False).requires_grad_(False)
        self.head = nn.Linear(width, width, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(self.features(x)) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Sums(L.Callback):
    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        expected = trainer.strategy.train_dataloader.collate_fn.expected_size
        self.sums.append(torch.cat([p.grad.flatten().double() for p in pl_module.parameters() if p.grad is not None]) * expected)


def _step_sum(dataset, width: int, engine: str) -> torch.Tensor:
    L.seed_everything(0, verbose=False)
    sums = _Sums()
    t = trainer(max_steps=1, precision="bf16-mixed", callbacks=[sums],
                strategy=DPStrategy(noise_multiplier=0.0, max_grad_norm=C, engine=engine, check_per_sample_grads=False))
    t.fit(_FrozenFeaturesHead(width), DataLoader(dataset, batch_size=len(dataset)))
    assert t.strategy.engine.name == engine
    return sums.sums[0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ghost", "hooks"])
def test_bf16_mixed_ghost_clipping_keeps_the_sensitivity_under_c(engine: str, no_spot_checks: None) -> None:
    """End to end: review 12 measured 2987 C here for ghost (hooks: 0.001 C)."""
    n, positions, width = 8, 255, 256
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, positions, width, generator=gen), torch.randn(n, positions, width, generator=gen)
    L.seed_everything(0, verbose=False)
    model = _FrozenFeaturesHead(width)
    s = torch.tensor([1.0, 1.0, -2.0] * (positions // 3))
    r = torch.tensor([1.75, 0.25, 1.0] * (positions // 3)) * 2.0**16
    x[0] = s[:, None] * (torch.randn(width, generator=gen) * 4096)[None, :]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.head(model.features(x)).float()[0]  # as the step computes it: on the whole batch
    y[0] = out
    y[0, :, 0] = out[:, 0] - r  # a crafted residual whose exact gradient cancels across positions
    full = _step_sum(TensorDataset(x, y), width, engine)
    without = _step_sum(Subset(TensorDataset(x, y), list(range(1, n))), width, engine)
    assert float((full - without).norm()) <= C * (1 + 1e-2)


@pytest.fixture
def fast_float32_settings() -> Any:
    """The process-wide switches users flip for speed, put back afterwards."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_flush_denormal(False)
    torch.set_float32_matmul_precision(precision)


def test_bf16_float32_products_do_not_round_a_contribution_past_c(fast_float32_settings: None) -> None:
    """``set_float32_matmul_precision("medium")`` runs float32 products in bf16 on CPUs with AMX
    (this project's CI machine; TF32 on CUDA): a Gram entry of 256 terms of 1.0038^2 came out
    256.0 instead of 257.95, the bound fell below the norm and the example released 1.0076 C. On
    a CPU without AMX (or bf16 matmuls) the setting changes nothing and this test cannot fail."""
    a = torch.full((1, 8, 256), 1.0038)
    grads = GhostGrads(1, 1)
    grads.add_linear(0, a, a.clone(), False, torch.Size([256, 256]))
    torch.set_float32_matmul_precision("medium")
    assert _released(grads, torch.Size([256, 256])) <= C * (1 + 1e-6)
    assert torch.get_float32_matmul_precision() == "medium"  # the user's setting, restored


@pytest.mark.parametrize("engine_grads", ["ghost", "materialized"])
def test_the_clipped_sum_is_exact_under_bf16_float32_products(fast_float32_settings: None, engine_grads: str) -> None:
    """Every engine's clipped sum, not only ghost clipping's: a weighted sum rounded to bf16
    moves each contribution by up to 2^-8 of itself (CPUs with AMX; TF32 on CUDA)."""
    from lightning_dp.mechanism.grads.engine import Materialized

    torch.manual_seed(0)
    a, g = torch.randn(16, 8, 32) + 1.0, torch.randn(16, 8, 24)
    per_example = torch.einsum("nli,nlo->noi", a.double(), g.double())
    if engine_grads == "ghost":
        grads: Any = GhostGrads(16, 1)
        grads.add_linear(0, a, g, False, torch.Size([24, 32]))
    else:
        grads = Materialized([per_example.float()], 16)
    # The mechanism's own factors (ghost clipping's norms are rigorous upper bounds), in float64.
    factors = (C / (grads.sq_norms(torch.float64).sqrt() + 1e-6)).clamp(max=1.0)
    exact = (per_example * factors.view(-1, 1, 1)).sum(0)
    torch.set_float32_matmul_precision("medium")
    w = nn.Parameter(torch.zeros(24, 32))
    mech = GaussianMechanism([w], max_grad_norm=C)
    mech.add(grads)
    mech.release(noise_multiplier=0.0, expected_batch_size=1.0)
    assert w.grad is not None
    assert float((w.grad.double() - exact).norm() / exact.norm()) < 1e-5


def test_flushing_subnormals_to_zero_does_not_release_a_crafted_example(fast_float32_settings: None) -> None:
    """``torch.set_flush_denormal(True)`` zeroes the subnormal Gram entries of gradients of 1e-20
    against inputs of 1e18, below the bound's underflow term (the smallest subnormal): the
    review's example released 82 C. The private arithmetic runs with gradual underflow."""
    from lightning_dp.mechanism.exact import _flushes_subnormals

    a, g = torch.full((1, 64, 128), 1e18), torch.full((1, 64, 128), 1e-20)
    grads = GhostGrads(1, 1)
    grads.add_linear(0, a, g, False, torch.Size([128, 128]))
    if not torch.set_flush_denormal(True):
        pytest.fail("this CPU cannot flush subnormals: the test would show nothing")
    assert _released(grads, torch.Size([128, 128])) <= C * (1 + 1e-3)
    assert _flushes_subnormals()  # the user's setting, restored
