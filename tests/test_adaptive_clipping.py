"""Adaptive clipping (Andrew et al. 2021): the norm converges to the target quantile, the count's
noise is accounted as part of one Gaussian mechanism at the noise multiplier the history records,
and a real Trainer logs and checkpoints the norm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Classifier, loader, make_dataset, tensorboard_scalars, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.mechanism.adaptive_clipping import AdaptiveClipping
from lightning_dp.mechanism.gaussian import GaussianMechanism
from lightning_dp.mechanism.streams import RandomStreams


def _run(norms: torch.Tensor, clip: AdaptiveClipping, steps: int, start: float, sigma: float = 1.0) -> list[float]:
    """Adaptive clipping on a fixed distribution of per-example gradient norms."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(4))
    streams = RandomStreams(seed=0, rank=0, start_step=0, fit_index=0)
    c, trace, b = start, [], float(len(norms))
    sigma_b = clip.count_std(b, sigma)
    sigma_g = clip.gradient_noise_multiplier(sigma, sigma_b)
    for _ in range(steps):
        directions = torch.nn.functional.normalize(torch.randn(len(norms), 4, generator=gen), dim=1)
        mech = GaussianMechanism([w], c, streams=streams)
        mech.add([directions * norms[torch.randperm(len(norms), generator=gen)].unsqueeze(1)])
        count = mech.release(sigma_g, b, count_noise_std=sigma_b)
        c = clip.next_norm(c, count, b)
        trace.append(c)
    return trace


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_the_clipping_norm_converges_to_the_target_quantile(quantile: float) -> None:
    norms = torch.linspace(0.0, 4.0, 256)  # uniform: the q-quantile is 4 q
    trace = _run(norms, AdaptiveClipping(target_quantile=quantile), steps=300, start=0.05)
    settled = float(np.mean(trace[-50:]))
    assert settled == pytest.approx(4 * quantile, rel=0.1)


def test_the_count_is_part_of_one_gaussian_mechanism_at_the_recorded_noise_multiplier() -> None:
    # Zero gradients: the released gradient is the gradient noise, the count minus B/2 the count noise.
    clip, z, b = AdaptiveClipping(), 1.3, 64.0
    sigma_b = clip.count_std(b, z)
    sigma_g = clip.gradient_noise_multiplier(z, sigma_b)
    assert sigma_g > z and (sigma_g**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    w = nn.Parameter(torch.zeros(2000))
    streams = RandomStreams(seed=1, rank=0, start_step=0, fit_index=0)
    grads, counts = [], []
    for _ in range(200):
        mech = GaussianMechanism([w], 2.0, streams=streams)
        mech.add([torch.zeros(int(b), 2000)])
        counts.append(mech.release(sigma_g, b, count_noise_std=sigma_b) - b / 2)  # every example unclipped
        grads.append(w.grad.clone() * b)
    assert float(torch.stack(grads).std()) == pytest.approx(sigma_g * 2.0, rel=0.02)
    assert float(np.std(counts)) == pytest.approx(sigma_b, rel=0.15)
    # The paper's effective noise multiplier of what was actually added is the recorded one.
    measured = (float(torch.stack(grads).std()) / 2.0) ** -2 + (2 * float(np.std(counts))) ** -2
    assert measured**-0.5 == pytest.approx(z, rel=0.1)


def test_a_count_noise_too_small_for_the_noise_is_refused_before_any_step() -> None:
    model = Classifier()
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=2.0, clipping="adaptive", count_noise=0.5))
    with pytest.raises(ValueError, match="count noise sigma_b=0.5 is too small"):
        t.fit(model, loader(make_dataset(), batch_size=8))
    assert model.training_step_calls <= 11  # only the start-of-fit check's calls, no step


def test_a_trainer_adapts_logs_and_checkpoints_the_norm(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    budget = PrivacyBudget(epsilon=30.0, delta=1e-5)
    t = trainer(max_steps=40, logger=logger, log_every_n_steps=1, callbacks=[budget], default_root_dir=tmp_path,
                strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=50.0, clipping="adaptive"))
    t.fit(Classifier(lr=0.05), loader(make_dataset(n=256), batch_size=64))
    assert t.strategy.max_grad_norm < 5.0  # it fell by 10x towards the median of the norms (a few at most)
    assert budget.history.segments == [(1.0, 0.25, 40)]  # accounted at the noise multiplier given
    logged = [v for _, v in tensorboard_scalars(Path(logger.log_dir))["dp/max_grad_norm"]]
    assert len(logged) == 40 and logged[0] == pytest.approx(50.0) and logged[-1] < logged[0]
    t.save_checkpoint(tmp_path / "a.ckpt")
    again = DPStrategy(noise_multiplier=1.0, max_grad_norm=50.0, clipping="adaptive")
    t2 = trainer(max_steps=41, strategy=again, callbacks=[PrivacyBudget(epsilon=30.0, delta=1e-5)],
                 default_root_dir=tmp_path)
    resumed_at = t.strategy.max_grad_norm
    t2.fit(Classifier(lr=0.05), loader(make_dataset(n=256), batch_size=64), ckpt_path=tmp_path / "a.ckpt")
    assert again.private.clip_norm != 50.0 and abs(math.log(again.max_grad_norm / resumed_at)) < 0.2  # one more step


def test_adaptive_clipping_is_refused_with_manual_optimization() -> None:
    from test_manual_optimization import D_IN, GAN

    with pytest.raises(ValueError, match="clipping='adaptive'"):
        trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, clipping="adaptive")).fit(
            GAN(), loader(make_dataset(n=32, d=D_IN), batch_size=8))
