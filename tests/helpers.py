"""Models and callbacks shared by several test files (the small classifier and data helpers
live in conftest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conftest import Classifier


class NoiseOnly(Classifier):
    """Every example's gradient is exactly zero, so each released gradient is the step's noise
    divided by the expected batch size. Records ``noise`` (released gradient times the expected
    batch size) at every optimizer step, also in loops that run without the Trainer's callbacks
    (the tuners')."""

    D = 20

    def __init__(self) -> None:
        super().__init__(d=self.D)
        self.net = nn.Linear(self.D, 50)
        self.noise: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        x, _ = batch
        return (self.net(x) * 0.0).sum(dim=1).mean()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        expected = self.trainer.strategy.train_dataloader.collate_fn.expected_size
        self.noise.append(torch.cat([p.grad.flatten() for p in self.parameters()]) * expected)
