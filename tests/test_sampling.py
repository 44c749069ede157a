"""Poisson sampling of the training loader, and that everything else about the loader is kept."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import Batches, Classifier, loader, make_dataset, trainer
from lightning_dp import DPStrategy
from lightning_dp.mechanism.sampling import PoissonBatch, PoissonBatchSampler, poisson_dataloader


def test_each_example_is_included_independently_at_rate_q() -> None:
    n, q, draws = 200, 0.1, 2000
    sampler = PoissonBatchSampler(n, q, steps=draws, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(n)
    sizes = []
    for batch in sampler:
        counts[batch] += 1
        sizes.append(len(batch))
        assert len(set(batch)) == len(batch)  # without replacement within a draw
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    # Batch size ~ Binomial(n, q): mean n*q = 20, variance n*q*(1-q) = 18.
    assert abs(sizes_t.mean().item() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes_t.var().item() / (n * q * (1 - q)) - 1) < 0.15
    # Every example's inclusion frequency ~ q (Binomial(draws, q) per example).
    freq = counts / draws
    assert (freq - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / draws)


def test_rate_length_and_chunks_of_the_rebuilt_loader(dataset) -> None:
    dl = poisson_dataloader(loader(dataset, batch_size=10), max_physical_batch_size=3)
    assert len(dl) == math.ceil(len(dataset) / 10)
    sampler = dl.batch_sampler
    assert isinstance(sampler, PoissonBatchSampler) and sampler.sample_rate == 10 / len(dataset)
    for x, y in dl:  # the whole draw, in the user's format
        batch = dl.draws.popleft()  # and the draw the strategy takes
        assert isinstance(batch, PoissonBatch) and not dl.draws
        assert batch.expected_size == 10.0
        assert all(len(c) == s <= 3 for (c, _), s in zip(batch.chunks, batch.sizes))
        assert len(x) == len(y) == batch.size
        if batch.size:
            assert torch.equal(torch.cat([c for c, _ in batch.chunks]), x)


def test_same_generator_seed_same_draws_secure_mode_not(dataset) -> None:
    def draws(secure: bool) -> list[list[int]]:
        dl = loader(dataset, batch_size=8, generator=torch.Generator().manual_seed(7))
        return list(poisson_dataloader(dl, secure_mode=secure).batch_sampler)

    assert draws(False) == draws(False)
    assert draws(True) != draws(True)


def dict_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}


def seed_worker(worker_id: int) -> None:
    torch.manual_seed(1234 + worker_id)


def test_user_loader_settings_are_kept(dataset) -> None:
    g = torch.Generator().manual_seed(3)
    dl = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=dict_collate, num_workers=2,
                    worker_init_fn=seed_worker, generator=g, persistent_workers=True, prefetch_factor=3,
                    timeout=30)
    out = poisson_dataloader(dl)
    assert out.dataset is dataset
    assert out.num_workers == 2 and out.worker_init_fn is seed_worker and out.generator is g
    assert out.persistent_workers and out.prefetch_factor == 3 and out.timeout == 30
    batches = list(out)  # real worker processes collate with the user's collate_fn
    assert all(isinstance(b, dict) and set(b) == {"x", "y"} for b in batches)
    assert all(isinstance(c, dict) for d in out.draws for c in d.chunks)


class DictModel(Classifier):
    """Uses a dict batch and a transfer hook that expects the user's own format."""

    transferred = 0

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        assert isinstance(batch, dict), "the user's hook must see the user's batch format"
        DictModel.transferred += 1
        return {**batch, "x": batch["x"] * 1.0}

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])


def test_custom_collate_and_transfer_hooks_work_through_the_trainer(dataset, no_spot_checks) -> None:
    rec = Batches()
    dl = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=dict_collate)
    t = trainer(max_steps=4, strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=3), callbacks=[rec])
    with pytest.warns(UserWarning):
        t.fit(DictModel(), dl)
    assert t.global_step == 4
    # One transfer per step (the whole draw, for the hooks) and one per chunk when the draw was split,
    # plus 6 for the start-of-fit check on 3 examples: three singles and the batch (plain autograd),
    # the batch and the batch but one (the engine).
    assert DictModel.transferred == sum(1 + len(b.chunks) * b.split for b in rec.batches) + 6


def test_validation_loader_is_left_exactly_as_given(dataset) -> None:
    val = DataLoader(make_dataset(n=20), batch_size=8)
    t = trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0), limit_val_batches=1.0, val_check_interval=2)
    with pytest.warns(UserWarning):
        t.fit(Classifier(), loader(dataset), val)
    assert t.val_dataloaders is val
    assert not isinstance(t.train_dataloader.batch_sampler, torch.utils.data.BatchSampler)
    assert isinstance(t.train_dataloader.batch_sampler, PoissonBatchSampler)
