"""The random sources of DP training: Poisson sampling, noise, and the check's choice of
examples, each a stream that is never replayed.

The accountant composes the steps of a run as *independent* sampled-Gaussian mechanisms. Two
steps that reuse a noise vector (or a Poisson draw) are not independent, and the epsilon
reported for them is wrong: a run resumed in a new process after ``seed_everything(0)`` that
draws its noise from torch's global generator adds exactly the noise of the original run's
first steps, and comparing the two checkpoints cancels it. So no stream here is derived from
torch's global generator, and by default none is derived from anything a user or an earlier
run can set: each fit, on each process, seeds its streams from the operating system's
entropy (:func:`secrets.randbits`).

A fixed ``seed`` makes a run reproducible for debugging. The streams are then derived from
the seed, the process's rank, the step the fit starts from and how many fits this strategy
ran before, so that resuming, a second ``fit`` or a tuner's trial fit, and other processes do
not replay each other's draws; but anyone who knows the seed can recompute the noise, so a
seeded run's guarantee holds only against someone who does not know it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional

import torch

__all__ = ["RandomStreams"]


class RandomStreams:
    """The random generators of one fit on one process.

    Args:
        seed: ``None`` (default): every stream seeded from OS entropy. An int: streams derived
            from it (reproducible; for debugging).
        rank: this process's global rank.
        start_step: the global step the fit starts from.
        fit_index: how many fits the strategy ran before this one (tuner trials included).

    Example:
        >>> a, b = RandomStreams(seed=0, rank=0, start_step=0, fit_index=0), RandomStreams(0, 0, 0, 0)
        >>> a.sampling.initial_seed() == b.sampling.initial_seed()  # seeded: reproducible
        True
        >>> RandomStreams(0, rank=1, start_step=0, fit_index=0).sampling.initial_seed() == a.sampling.initial_seed()
        False
        >>> RandomStreams(None, 0, 0, 0).sampling.initial_seed() == RandomStreams(None, 0, 0, 0).sampling.initial_seed()
        False
    """

    def __init__(self, seed: Optional[int], rank: int, start_step: int, fit_index: int) -> None:
        self.seed = seed
        self._context = (rank, start_step, fit_index)
        #: The Poisson sampler's generator (CPU).
        self.sampling = torch.Generator().manual_seed(self._derive("sampling"))
        #: Picks the examples of the start-of-fit check.
        self.check = torch.Generator().manual_seed(self._derive("check"))
        self._noise: dict[torch.device, torch.Generator] = {}

    def noise(self, device: torch.device) -> torch.Generator:
        """The noise generator on ``device`` (one per device, created on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._noise:
            self._noise[device] = torch.Generator(device=device).manual_seed(self._derive(f"noise:{device}"))
        return self._noise[device]

    def _derive(self, purpose: str) -> int:
        if self.seed is None:
            return secrets.randbits(63)
        text = repr((self.seed, purpose, *self._context)).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)
