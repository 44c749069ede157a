"""``self.log`` inside a private step: a Poisson batch may run ``training_step`` once per physical
chunk, and its logs must count once per step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["logged_once_per_step"]


class _StepLogs:
    """``self.log`` calls made while a Poisson batch runs chunk by chunk, replayed once for
    the whole batch: each value as the mean over chunks weighted by their example counts."""

    def __init__(self) -> None:
        self.chunk_size = 0
        self.calls: dict[str, list[tuple[Any, float, dict[str, Any]]]] = {}

    def record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError("Under DP training, pass self.log options by keyword (prog_bar=..., on_step=...)")
        weight = kwargs.pop("batch_size", None) or self.chunk_size
        self.calls.setdefault(name, []).append((value, float(weight), kwargs))

    def replay(self, module: pl.LightningModule) -> None:
        for name, calls in self.calls.items():
            value, _, kwargs = calls[-1]
            total = sum(w for _, w, _ in calls)
            if len(calls) > 1 and all(isinstance(v, (Tensor, int, float)) for v, _, _ in calls):
                value = sum(torch.as_tensor(v, dtype=torch.float32).detach() * (w / total) for v, w, _ in calls)
            module.log(name, value, batch_size=int(total), **kwargs)


@contextmanager
def logged_once_per_step(module: pl.LightningModule) -> Iterator[_StepLogs]:
    logs = _StepLogs()
    module.log = logs.record  # type: ignore[method-assign]  # log_dict calls self.log too
    try:
        yield logs
    finally:
        del module.log
    logs.replay(module)
