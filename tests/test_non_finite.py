"""One bad example cannot poison the model: NaN, inf and huge values are bounded by clipping for
every engine, the user is told, and the report counts them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.mechanism import GaussianMechanism

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
    assert report["safety_checks"]["non_finite_examples_dropped"] == 8


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
