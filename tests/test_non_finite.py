"""One bad example cannot poison the model: NaN, inf and huge values are bounded by clipping for
every engine, the user is told, and the report counts them."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.mechanism.gaussian import GaussianMechanism

ENGINES = ["ghost", "hooks", "functorch", "loop"]
N = 32
C = 1.0


def poisoned(value: float, where: int = 5) -> TensorDataset:
    x, y = make_dataset(n=N).tensors
    x = x.clone()
    x[where, 2] = value
    return TensorDataset(x, y)


def without(ds: TensorDataset, where: int = 5) -> TensorDataset:
    keep = [i for i in range(len(ds)) if i != where]
    return TensorDataset(*(t[keep] for t in ds.tensors))


class ReleasedSum(Classifier):
    """Records the released gradient times the expected batch size: the clipped sum (plus noise)."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.sums: list[torch.Tensor] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        expected = self.trainer.strategy.train_dataloader.collate_fn.expected_size
        self.sums.append(torch.cat([p.grad.flatten() for p in self.parameters()]) * expected)


def released_sum(ds: TensorDataset, engine: str) -> torch.Tensor:
    torch.manual_seed(0)  # the same initial weights for both datasets
    model = ReleasedSum()
    # q = 1 (the batch is the whole set), no noise: the release is exactly the clipped sum.
    t = trainer(max_steps=1, strategy=DPStrategy(max_grad_norm=C, noise_multiplier=0.0, engine=engine,
                                                 max_physical_batch_size=8))
    t.fit(model, loader(ds, batch_size=len(ds)))
    return model.sums[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30], ids=["nan", "inf", "1e30"])
def test_one_bad_example_moves_the_released_sum_by_at_most_c(engine: str, value: float) -> None:
    ds = poisoned(value)
    with_it = released_sum(ds, engine)
    without_it = released_sum(without(ds), engine)
    assert torch.isfinite(with_it).all()
    # DP-SGD's sensitivity: adding or removing one example moves the clipped sum by at most C.
    assert float((with_it - without_it).norm()) <= C * (1 + 1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_training_with_nan_inf_and_huge_examples_keeps_parameters_finite(engine: str, tmp_path) -> None:
    x, y = make_dataset(n=N).tensors
    x = x.clone()
    x[3, 0], x[11, 1], x[20, 4] = math.nan, -math.inf, 1e30
    model = Classifier(lr=0.5)
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    t = trainer(max_steps=4, default_root_dir=tmp_path, strategy=DPStrategy(engine=engine), callbacks=[budget])
    with pytest.warns(UserWarning, match=r"non-finite gradient"):
        t.fit(model, loader(TensorDataset(x, y), batch_size=N))  # q = 1: every step sees all three
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert t.strategy.non_finite_examples_total == 2 * 4  # NaN and inf each step; 1e30 is clipped, not dropped
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    # The report says only whether: the count is a statistic of the private data.
    assert report["safety_checks"]["non_finite_examples_dropped"] is True


def test_the_mechanism_drops_non_finite_rows_and_clips_huge_ones_exactly() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    mech = GaussianMechanism([w], max_grad_norm=1.0)
    grads = torch.tensor([[3e30, 4e30, 0.0], [math.nan, 1.0, 1.0], [0.0, math.inf, 0.0], [0.3, 0.4, 0.0]])
    norms = mech.add([grads])
    assert norms[0] == pytest.approx(5e30) and math.isnan(norms[1]) and math.isnan(norms[2])
    assert mech.dropped == 2
    mech.release(noise_multiplier=0.0, expected_batch_size=1.0)
    # The huge example clipped to norm 1 (0.6, 0.8), the small one kept, the others dropped.
    assert torch.allclose(w.grad, torch.tensor([0.9, 1.2, 0.0]), atol=1e-6)


# --------------------------------------------------------------------------- rounding cannot hide a norm
class PerStepRegression(L.LightningModule):
    """A Linear layer over positions (T * T <= d_in * d_out: the ghost route, a T x T Gram)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("u, log2m, r", [(100.0, 20, 1.0), (1e4, 30, 256.0), (1e5, 40, 2.0**20)])
def test_an_example_crafted_to_cancel_in_the_ghost_norm_is_still_clipped(u: float, log2m: int, r: float) -> None:
    # Two positions whose outer products nearly cancel: in float32 the Gram sum of the ghost norm
    # came out far below the true norm (or negative), and the example escaped clipping (100x C).
    n, m = 32, float(2**log2m)
    x, y = torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(n, 2, 1)
    torch.manual_seed(0)
    head = PerStepRegression().head
    x[5] = torch.tensor([[m, u, 0.0, 0.0], [-m, u, 0.0, 0.0]])
    with torch.no_grad():
        y[5] = head(x[5]) - r
    ds = TensorDataset(x, y)

    def release(data: TensorDataset) -> torch.Tensor:
        torch.manual_seed(0)
        model, grab = PerStepRegression(), Grab()
        t = trainer(max_steps=1, callbacks=[grab], strategy=DPStrategy(max_grad_norm=C, noise_multiplier=0.0,
                                                                       engine="ghost"))
        t.fit(model, loader(data, batch_size=len(data)))
        return grab.sums[0]

    assert float((release(ds) - release(without(ds))).norm()) <= C * (1 + 1e-4)


class Grab(L.Callback):
    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        expected = trainer.strategy.train_dataloader.collate_fn.expected_size
        self.sums.append(torch.cat([p.grad.flatten().double() for p in pl_module.parameters()]) * expected)


def test_the_ghost_norm_bound_is_never_below_the_materialised_norm() -> None:
    from lightning_dp.mechanism.grads.ghost_grads import gram_bound

    g = torch.Generator().manual_seed(1)
    for trial in range(50):
        n, t, di, do = 3, int(torch.randint(1, 40, (1,), generator=g)), 8, 5
        a, out = torch.randn(n, t, di, generator=g), torch.randn(n, t, do, generator=g)
        if trial % 2:  # adversarial: pairs of positions that cancel, at a large scale
            a[:, 1::2] = -a[:, 0:-1:2] if t > 1 else a[:, 1::2]
            a, out = a * 1e6, out.abs() * 1e3
        exact = torch.einsum("nli,nlo->noi", a.double(), out.double()).flatten(1).norm(dim=1).square()
        assert (gram_bound(a, out, None)[0] >= exact * (1 - 1e-9)).all()
        ids = torch.randint(0, 4, (n, t), generator=g)
        rows = torch.zeros(n, 4, do, dtype=torch.float64)  # each example's embedding gradient
        for k in range(n):
            rows[k].index_add_(0, ids[k], out[k].double())
        assert (gram_bound(None, out, ids)[0] >= rows.flatten(1).norm(dim=1).square() * (1 - 1e-9)).all()
