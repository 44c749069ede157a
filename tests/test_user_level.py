"""User-level privacy: users are Poisson-sampled, a user's examples are capped, and the gradient
of the sum of a user's examples is clipped as one, exactly, with every engine."""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import pytest
import torch
from conftest import Classifier, loader, make_dataset, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.mechanism.grads.check import PerSampleGradientMismatch
from lightning_dp.mechanism.grads.engine import Materialized
from lightning_dp.mechanism.user_sampling import UserPoissonBatchSampler, user_groups

C = 0.05


class UserData(TensorDataset):
    """Examples with the id of the user who wrote them: users of 1 to 7 examples."""

    def __init__(self, sizes=(1, 7, 2, 5, 3, 1, 6, 4), d: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        n = sum(sizes)
        super().__init__(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))
        self.user_ids = [f"user{u}" for u, size in enumerate(sizes) for _ in range(size)]


class Plain(Classifier):
    """Keeps no state in training_step (functorch runs it under vmap)."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(x, y)


class Released(L.Callback):
    """What each step trained on, and the update it released."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch  # the whole draw, as hooks see it (its chunks, in order, make it up)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        draw = trainer.strategy.last_draw
        self.steps.append({"units": draw.units, "expected": draw.expected_size, "batch": self.batch,
                           "grad": [p.grad.detach().clone() for p in pl_module.parameters()]})


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, units, expected: float) -> list[torch.Tensor]:
    """Per-example gradients by autograd on each example alone, summed per user, clipped to C,
    summed and divided by the expected number of users."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    start = 0
    for n_u in units:
        user = [torch.zeros_like(p) for p in params]
        for i in range(start, start + n_u):
            loss = nn.functional.cross_entropy(model.net(x[i : i + 1]), y[i : i + 1])
            for acc, g in zip(user, torch.autograd.grad(loss, params)):
                acc += g
        norm = math.sqrt(sum(float(g.square().sum()) for g in user))
        factor = min(1.0, C / (norm + 1e-6))
        for acc, g in zip(total, user):
            acc += factor * g
        start += n_u
    return [t / expected for t in total]


@pytest.mark.parametrize("engine", ["ghost", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("max_physical_batch_size", [None, 7])
def test_the_update_is_the_clipped_sum_of_each_users_gradient(engine: str, max_physical_batch_size,
                                                               no_spot_checks) -> None:
    data = UserData()
    model = Plain()
    before = [p.detach().clone() for p in model.parameters()]
    released = Released()
    t = trainer(max_steps=2, callbacks=[released], strategy=DPStrategy(
        noise_multiplier=0.0, max_grad_norm=C, engine=engine, privacy_unit="user", max_examples_per_user=5,
        max_physical_batch_size=max_physical_batch_size))
    t.fit(model, DataLoader(data, batch_size=8))  # q = 8 users / 8 users = 1: every user in every draw
    assert t.strategy.engine.name == engine and t.strategy.sample_rate == 1.0
    step = released.steps[-1]
    units = [n for chunk in step["units"] for n in chunk]
    assert sorted(units) == sorted(min(s, 5) for s in (1, 7, 2, 5, 3, 1, 6, 4))  # the cap holds
    if max_physical_batch_size is not None:
        assert all(sum(chunk) <= 7 for chunk in step["units"]) and len(step["units"]) > 1
    x, y = step["batch"]
    reference = Classifier(lr=0.0)
    reference.load_state_dict({k: v for k, v in zip(dict(reference.named_parameters()), before)}, strict=False)
    want = brute_force(reference, x, y, units, step["expected"])
    for got, ref in zip(step["grad"], want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_users_are_sampled_at_rate_q_and_capped() -> None:
    sizes = [1, 2, 30] + [3] * 197
    ids = [u for u, n in enumerate(sizes) for _ in range(n)]
    groups = user_groups(ids, len(ids))
    sampler = UserPoissonBatchSampler(groups, 0.3, steps=3000, cap=4, generator=torch.Generator().manual_seed(0))
    joined, examples = Counter(), Counter()
    for draw in sampler:
        per_user = Counter(ids[i] for i, _ in draw)
        assert all(n <= 4 for n in per_user.values())  # the cap
        joined.update(per_user.keys())
        examples.update(i for i, _ in draw)
    rates = [joined[u] / 3000 for u in range(len(sizes))]
    assert max(abs(r - 0.3) for r in rates) < 0.04  # every user joins at rate q, whatever their size
    big = groups[2]
    # The big user's 4 examples per draw are a fresh uniform subset of their 30.
    assert max(abs(examples[i] / 3000 - 0.3 * 4 / 30) for i in big) < 0.02


def test_a_shard_without_users_draws_empty_batches() -> None:
    groups = user_groups(["a", "a", "b"], 3, rank=2, world_size=3)  # two users, three processes
    assert groups == []
    sampler = UserPoissonBatchSampler(groups, 0.5, steps=3, cap=2)
    assert list(sampler) == [[], [], []]


def test_every_figure_is_user_level_and_delta_is_checked_against_the_number_of_users(tmp_path) -> None:
    budget = PrivacyBudget(epsilon=30.0, delta=0.2)  # delta >= 1/8 users: warned about
    t = trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[budget], strategy=DPStrategy(
        noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3))
    with pytest.warns(UserWarning, match="for N=8 training users"):
        t.fit(Classifier(), DataLoader(UserData(), batch_size=2))
    assert budget.history.segments == [(1.0, 2 / 8, 3)]  # q over users
    checks = t.strategy.safety_checks()
    assert checks["privacy_unit"] == "user" and checks["max_examples_per_user"] == 3 and checks["passed"]


class BrokenGrouping(Materialized):
    def grouped(self, units):
        out = super().grouped(units)
        out.grads = [None if g is None else g * 0.5 for g in out.grads]  # half of each user's sum
        return out


def test_the_check_fails_an_engine_whose_per_user_gradients_are_wrong() -> None:
    from lightning_dp.mechanism.grads.functorch import FunctorchEngine
    from lightning_dp.mechanism.grads.selection import check_examples, spot_check

    class Halving(FunctorchEngine):
        def compute(self, step, batch, params, batch_size, loss_reduction):
            output, loss, grads = super().compute(step, batch, params, batch_size, loss_reduction)
            return output, loss, BrokenGrouping(grads.grads, grads.batch_size)

    model = Classifier()
    data = make_dataset(n=16)
    engine = Halving()
    engine.attach(model)
    examples = check_examples(data, 8, torch.Generator().manual_seed(0),
                              lambda items: (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])),
                              lambda b: (None, nn.functional.cross_entropy(model.net(b[0]), b[1])), None)
    with pytest.raises(PerSampleGradientMismatch, match="per-user gradients"):
        spot_check(engine, model, examples, "mean", 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"privacy_unit": "user"}, "max_examples_per_user"),
        ({"privacy_unit": "user", "max_examples_per_user": 0}, "max_examples_per_user"),
        ({"privacy_unit": "user", "max_examples_per_user": 4, "max_physical_batch_size": 3}, "whole user"),
        ({"max_examples_per_user": 4}, "apply to privacy_unit='user'"),
        ({"privacy_unit": "person"}, "privacy_unit must be"),
    ],
)
def test_bad_user_level_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPStrategy(noise_multiplier=1.0, **kwargs)


def test_bad_user_ids_and_batch_sizes_are_refused_before_training() -> None:
    data = UserData()
    for user_ids, batch_size, message in ((None, 9, "exceeds the 8 users"), ([0, 1], 2, "one user id per example"),
                                          ([[0]] * len(data), 2, "strings, integers")):
        strategy = DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3, user_ids=user_ids)
        with pytest.raises(ValueError, match=message):
            trainer(max_steps=1, strategy=strategy).fit(Classifier(), DataLoader(data, batch_size=batch_size))
    plain = make_dataset(n=16)
    with pytest.raises(ValueError, match="user_ids attribute"):
        trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3)).fit(
            Classifier(), loader(plain, batch_size=4))
    # A callable on the dataset (works with DataModules).
    t = trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3,
                                                 user_ids=lambda ds: [i // 2 for i in range(len(ds))]))
    t.fit(Classifier(), loader(plain, batch_size=4))
    assert t.strategy.sample_rate == 4 / 8


@pytest.mark.parametrize(("positions", "width"), [(2, 64), (40, 4)])  # the packed Gram, then the gradient itself
def test_ghost_grouping_gives_each_users_summed_gradient(positions: int, width: int) -> None:
    from lightning_dp.mechanism.grads.ghost_grads import GhostGrads

    g = torch.Generator().manual_seed(0)
    n, units, w = 5, [2, 1, 2], torch.tensor([0.5, 1.0, 2.0])
    a, out = torch.randn(n, positions, width, generator=g), torch.randn(n, positions, width, generator=g)
    ids = torch.randint(0, 7, (n, positions), generator=g)
    grads = GhostGrads(n, 2)
    grads.add_linear(0, a, out, False, torch.Size([width, width]))
    grads.add_embedding(1, ids, out, 7)
    grouped = grads.grouped(units)
    linear = torch.einsum("nli,nlo->noi", a.double(), out.double())
    embedding = torch.zeros(n, 7, width, dtype=torch.float64)
    for i in range(n):
        embedding[i].index_add_(0, ids[i], out[i].double())
    bounds = torch.tensor([0, 2, 3, 5])
    users = [torch.stack([t[bounds[u]:bounds[u + 1]].sum(0) for u in range(3)]) for t in (linear, embedding)]
    norms = (users[0].flatten(1).square().sum(1) + users[1].flatten(1).square().sum(1)).sqrt()
    bound = grouped.sq_norms(torch.float64).sqrt()
    assert (bound >= norms * (1 - 1e-6)).all() and torch.allclose(bound, norms, rtol=1e-4)  # not below, and tight
    for got, want in zip(grouped.weighted_sum(w), users):
        torch.testing.assert_close(got.double(), torch.einsum("u,u...->...", w.double(), want), rtol=1e-4, atol=1e-5)


def test_user_ids_are_read_as_values_and_bad_ones_are_refused() -> None:
    import numpy as np

    from lightning_dp.mechanism.user_sampling import canonical_user_ids, user_groups

    # Review 15: a tensor's elements hash by identity, so each example became its own "user" (4 C measured).
    ids = canonical_user_ids(torch.tensor([3, 3, 5, 5, 5, 9]))
    assert [len(g) for g in user_groups(ids, 6)] == [2, 3, 1]
    assert canonical_user_ids(np.array(["a", "b", "a"])) == ["a", "b", "a"]
    for bad, message in (([1.0, float("nan")], "not a usable id"), ([1, 1.0], "mix"), ([1, True], "strings, integers"),
                         ([None, 1], "strings, integers"), ([object(), 1], "strings, integers")):
        with pytest.raises(ValueError, match=message):
            canonical_user_ids(bad)


def _sorting_collate(items):
    order = sorted(range(len(items)), key=lambda i: int(items[i][1]))  # sorts the batch by label
    return torch.stack([items[i][0] for i in order]), torch.stack([items[i][1] for i in order])


def test_a_collate_that_reorders_examples_is_refused_at_user_level() -> None:
    data = UserData()
    strategy = DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3,
                          check_per_sample_grads=False)
    with pytest.raises(ValueError, match="reorders the examples"):
        trainer(max_steps=1, strategy=strategy).fit(Classifier(), DataLoader(data, batch_size=2,
                                                                             collate_fn=_sorting_collate))


def test_one_shot_user_ids_survive_a_second_fit_and_all_distinct_ids_warn() -> None:
    data = UserData()
    strategy = DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3,
                          user_ids=iter(data.user_ids))
    t = trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, strategy=strategy)  # the loader is built twice
    t.fit(Classifier(), DataLoader(data, batch_size=2))
    assert t.strategy.sample_rate == 2 / 8 and t.global_step == 8
    distinct = DPStrategy(noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=3,
                          user_ids=list(range(len(data))))
    with pytest.warns(UserWarning, match="different users for 29 examples"):
        trainer(max_steps=1, strategy=distinct).fit(Classifier(), DataLoader(data, batch_size=2))
