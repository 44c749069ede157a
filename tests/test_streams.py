"""Noise and Poisson draws are never replayed: not after a resume in a new process, not by a
second fit, not after a tuner, not on another process; secure mode stays freshly seeded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.tuner import Tuner

from conftest import Batches, loader, make_dataset, trainer
from helpers import NoiseOnly
from lightning_dp import DPStrategy, PrivacyBudget
from lightning_dp.mechanism.streams import RandomStreams

SCRIPT = Path(__file__).resolve().parent / "noise_run.py"


def run_together(runs: list[tuple]) -> list[torch.Tensor]:
    """Independent runs of the script in separate processes at the same time (their start-up,
    mostly imports, overlaps)."""
    procs = []
    for out, *args in runs:
        out.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=out))  # its privacy report goes there
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return [torch.load(out / "noise.pt") for out, *_ in runs]


def assert_no_vector_repeats(a: torch.Tensor, b: torch.Tensor) -> None:
    """No noise vector of ``a`` equals (or nearly equals) one of ``b``: their correlation is what
    independent Gaussians give (|r| ~ 1/sqrt(d)), never 1."""
    for u in a:
        for v in b:
            r = torch.dot(u, v) / (u.norm() * v.norm())
            assert abs(float(r)) < 0.5


@pytest.fixture(scope="module")
def process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The fresh-process runs the next two tests read: three first runs (one unseeded, two with
    seed 3) together, then a resume of the unseeded one and of a seeded one together."""
    root = tmp_path_factory.mktemp("streams")
    firsts = {"first": (), "a": ("--seed", "3"), "b": ("--seed", "3")}
    out = dict(zip(firsts, run_together([(root / name, *args) for name, args in firsts.items()])))
    resumes = {"resumed": ("--resume", str(root / "first" / "step2.ckpt")),
               "r": ("--seed", "3", "--resume", str(root / "a" / "step2.ckpt"))}
    out.update(zip(resumes, run_together([(root / name, *args) for name, args in resumes.items()])))
    return out


@pytest.mark.slow
def test_a_run_resumed_in_a_new_process_draws_fresh_noise(process_runs: dict[str, torch.Tensor]) -> None:
    # The usual script: seed_everything(0) in each process. Before, noise came from torch's global
    # generator, and the resumed steps added exactly the first steps' noise again.
    first, resumed = process_runs["first"], process_runs["resumed"]
    assert first.shape[0] == 4 and resumed.shape[0] == 2
    assert_no_vector_repeats(resumed, first)
    # The noise has the promised scale: std sigma * C = 1 per coordinate.
    assert abs(float(torch.cat([first, resumed]).std()) - 1.0) < 0.05


@pytest.mark.slow
def test_a_seeded_run_is_reproducible_and_its_resume_still_draws_new_noise(process_runs: dict[str, torch.Tensor]) -> None:
    a, b = process_runs["a"], process_runs["b"]
    assert torch.equal(a, b)  # for debugging: the same seed, the same run
    assert_no_vector_repeats(process_runs["r"], a)
    assert not torch.equal(a, process_runs["first"])  # the seed, not the script's seed_everything, decides


def fit_noise_only(t: L.Trainer, model: NoiseOnly) -> None:
    t.fit(model, loader(make_dataset(n=64, d=NoiseOnly.D), batch_size=8))


def test_a_second_fit_of_the_same_trainer_draws_fresh_noise_and_batches() -> None:
    model, rec = NoiseOnly(), Batches()
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[rec])
    L.seed_everything(0)
    fit_noise_only(t, model)
    first, first_batches = torch.stack(model.noise), [c[0] for b in rec.batches for c in b.chunks]
    model.noise.clear()
    rec.batches.clear()
    t.fit_loop.epoch_loop.max_steps = 6
    L.seed_everything(0)
    fit_noise_only(t, model)
    second = torch.stack(model.noise)
    assert_no_vector_repeats(second, first)
    second_batches = [c[0] for b in rec.batches for c in b.chunks]
    assert not all(torch.equal(a, b) for a, b in zip(first_batches, second_batches))


def test_fresh_runs_with_the_same_global_seed_draw_different_noise() -> None:
    noise = []
    for _ in range(2):
        L.seed_everything(0)
        model = NoiseOnly()
        fit_noise_only(trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0)), model)
        noise.append(torch.stack(model.noise))
    assert_no_vector_repeats(noise[0], noise[1])


def test_lr_find_then_fit_never_replays_the_noise() -> None:
    model = NoiseOnly()
    model.lr = 0.01
    budget = PrivacyBudget(epsilon=30.0, delta=1e-5)
    t = trainer(max_epochs=2, strategy=DPStrategy(), callbacks=[budget])
    L.seed_everything(0)
    Tuner(t).lr_find(model, loader(make_dataset(n=64, d=NoiseOnly.D), batch_size=8), num_training=5,
                     early_stop_threshold=None)
    tuned = torch.stack(model.noise)
    model.noise.clear()
    L.seed_everything(0)
    fit_noise_only(t, model)
    assert tuned.shape[0] == 5 and len(model.noise) > 0
    assert_no_vector_repeats(torch.stack(model.noise), tuned)


def test_seeded_streams_differ_by_rank_start_step_and_fit() -> None:
    base = RandomStreams(seed=5, rank=0, start_step=0, fit_index=0)
    others = [RandomStreams(5, 1, 0, 0), RandomStreams(5, 0, 2, 0), RandomStreams(5, 0, 0, 1)]
    seeds = {base.sampling.initial_seed(), base.noise(torch.device("cpu")).initial_seed(), base.check.initial_seed()}
    assert len(seeds) == 3  # sampling, noise and the check are separate streams
    for other in others:
        assert other.sampling.initial_seed() != base.sampling.initial_seed()
        assert other.noise(torch.device("cpu")).initial_seed() != base.noise(torch.device("cpu")).initial_seed()


def test_a_seed_warns_that_it_is_for_debugging() -> None:
    with pytest.warns(UserWarning, match="debugging only"):
        fit_noise_only(trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, seed=1)), NoiseOnly())


def test_the_noise_is_independent_of_torchs_global_generator() -> None:
    # Two runs from the same global state draw different noise, and the noise draws leave the
    # global generator where the rest of the run leaves it (they do not consume from it).
    noisy, silent = NoiseOnly(), NoiseOnly()
    L.seed_everything(0)
    fit_noise_only(trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0)), noisy)
    after_noise = torch.rand(1)
    L.seed_everything(0)
    fit_noise_only(trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=0.0)), silent)
    assert torch.equal(after_noise, torch.rand(1))


def test_secure_mode_noise_is_fresh_even_with_a_seed() -> None:
    noise = []
    for _ in range(2):
        model = NoiseOnly()
        fit_noise_only(trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, secure_mode=True, seed=1)), model)
        noise.append(torch.stack(model.noise))
    assert_no_vector_repeats(noise[0], noise[1])
