"""Choosing the per-sample gradient engine for a model, and verifying it: before the first step
and at spot checks during training.

``engine="auto"`` tries the engines of :data:`~lightning_dp.mechanism.grads.registry.ENGINES` in
order and keeps the first whose per-sample gradients pass the check (``check.py``) on real
training examples; a loss that is not per example is refused whatever the engine. Nothing here
knows Lightning: the caller hands over the model, its training step and a way to build batches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dp.mechanism.grads.check import (
    RTOL,
    LossNotPerExample,
    PerSampleGradientMismatch,
    Reference,
    check_per_sample_grads,
    no_dropout,
    reference_grads,
)
from lightning_dp.mechanism.grads.engine import (
    LossReduction,
    PerSampleGradEngine,
    metrics_kept,
    param_names,
    silenced_logging,
)
from lightning_dp.mechanism.grads.registry import ENGINES, FAST_ENGINES, make_engine

__all__ = ["CheckExamples", "EngineChoice", "check_examples", "choose_engine", "spot_check", "trainable"]

#: Examples the start-of-fit check draws (one per slice of the training set).
START_EXAMPLES = 8
#: A spot check runs at about one step in this many, on this many fresh examples.
SPOT_CHECK_EVERY = 64
SPOT_EXAMPLES = 4


class CheckExamples(NamedTuple):
    """Real training examples for a check: ``batch_of(positions)`` builds a batch of them on the
    device; ``step(batch)`` runs the user's training step on it and returns ``(output, loss)``."""

    n: int
    batch_of: Callable[[Sequence[int]], Any]
    step: Callable[[Any], tuple[Any, Tensor]]
    least: int  # examples with a finite loss needed


@dataclass
class EngineChoice:
    """The engine chosen, what its check found (for the privacy report), and why the others
    were passed over."""

    engine: PerSampleGradEngine
    check: dict[str, Any]
    message: str
    rejected: dict[str, str]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (recomputed every step: a layer unfrozen by a callback must be
    clipped and noised too)."""
    return [p for p in module.parameters() if p.requires_grad]


def check_examples(
    dataset: Any,
    count: int,
    generator: torch.Generator,
    batch_of_examples: Callable[[list[Any]], Any],
    step: Callable[[Any], tuple[Any, Tensor]],
    max_physical_batch_size: Optional[int],
) -> CheckExamples:
    """Up to ``count`` training examples: one drawn at random (with ``generator``) from each of as
    many equal slices of ``dataset`` (so a class-sorted dataset shows the check different classes,
    not its first few look-alikes), each fetched once (a dataset with random augmentation hands
    the batch and the one-example passes the same tensors)."""
    size = len(dataset)
    n = min(count, size, max(max_physical_batch_size or count, 2))
    bounds = [size * k // n for k in range(n + 1)]
    with _global_rngs_kept():  # random augmentations must not advance training's random state
        examples = [dataset[lo + int(torch.randint(hi - lo, (1,), generator=generator))]
                    for lo, hi in zip(bounds, bounds[1:])]
    # One example is enough only where training never puts two in one batch.
    least = 1 if size == 1 or max_physical_batch_size == 1 else 2
    return CheckExamples(len(examples), lambda positions: batch_of_examples([examples[i] for i in positions]), step, least)


@contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """torch's (CPU), Python's and numpy's global random states, put back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def check_rtol(module: nn.Module) -> float:
    """The check's relative tolerance: float32 arithmetic's, unless parameters are 16-bit."""
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable(module))
    return 3e-2 if low else RTOL


def check_context(module: nn.Module) -> ExitStack:
    """What every check pass runs under: training mode, no logging, metrics and buffers kept (a
    floating-point buffer that the passes change is refused), dropout off, the RNG put back."""
    stack = ExitStack()
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    stack.enter_context(torch.random.fork_rng(devices=devices))
    stack.enter_context(_train_mode(module))
    stack.enter_context(silenced_logging(module))
    stack.enter_context(metrics_kept(module))
    stack.enter_context(_buffers_unchanged(module))
    stack.enter_context(no_dropout(module))
    return stack


def _reference(module: nn.Module, examples: CheckExamples, loss_reduction: LossReduction) -> Reference:
    return reference_grads(trainable(module), examples.batch_of, examples.step, examples.n, loss_reduction,
                           param_names(module), check_rtol(module), examples.least)


def choose_engine(
    module: nn.Module,
    engine: str,
    loss_reduction: LossReduction,
    examples: Optional[CheckExamples],
    who: str = "DPStrategy",
) -> EngineChoice:
    """Attach and return the engine to train with: the one named, or with ``"auto"`` the first
    whose per-sample gradients pass the check on ``examples`` (``None``: no check).

    Raises:
        LossNotPerExample: the loss is not per example (no engine can fix that).
        PerSampleGradientMismatch: the named engine, or with ``"auto"`` every engine, fails.
    """
    reference = None
    if examples is not None:
        # The user's loss with plain autograd, once for every engine tried.
        with check_context(module):
            reference = _reference(module, examples, loss_reduction)
    rejected: dict[str, str] = {}
    for name in ENGINES if engine == "auto" else (engine,):
        try:
            candidate = make_engine(name, loss_reduction)
            problems = candidate.unsupported(module)
        except Exception as err:  # an engine that cannot even look at the model is passed over
            rejected[name] = f"{type(err).__name__}: {err}"
            continue
        if problems:
            rejected[name] = "; ".join(problems)
            continue
        try:
            candidate.attach(module)
            check, verified = _verify(candidate, module, examples, reference, loss_reduction)
        except PerSampleGradientMismatch as err:
            candidate.detach()
            if engine != "auto":
                raise
            rejected[name] = str(err)
            continue
        except Exception as err:  # any failure while checking is a rejection, never a crash
            candidate.detach()
            if engine != "auto":
                raise
            rejected[name] = f"failed while checking it: {type(err).__name__}: {err}"
            continue
        passed_over = "".join(f"\n  - '{n}' passed over: {why}" for n, why in rejected.items())
        message = f"{who}: per-sample gradients by the '{name}' engine ({verified}).{passed_over}"
        return EngineChoice(candidate, {"engine": name, **check}, message, rejected)
    raise PerSampleGradientMismatch(
        "No per-sample gradient engine computes exact per-example gradients for this model:\n"
        + "\n".join(f"  - '{n}': {why}" for n, why in rejected.items())
    )


def is_slow_fallback(choice: EngineChoice) -> bool:
    """Whether ``auto`` fell back to an engine that runs each example alone."""
    return bool(choice.rejected) and choice.check["engine"] not in FAST_ENGINES


def _verify(
    engine: PerSampleGradEngine,
    module: nn.Module,
    examples: Optional[CheckExamples],
    reference: Optional[Reference],
    loss_reduction: LossReduction,
) -> tuple[dict[str, Any], str]:
    if examples is None or reference is None:
        return {"verified": False, "spot_checks": 0}, "NOT verified"
    start = time.perf_counter()
    with check_context(module):
        worst = check_per_sample_grads(engine, module, trainable(module), examples.batch_of, examples.step,
                                       list(range(examples.n)), loss_reduction, reference, check_rtol(module))
    n = reference.n
    check = {"verified": True, "examples": n, "worst_relative_error": float(worst), "cross_talk_checked": n >= 2,
             "examples_skipped": reference.skipped, "spot_checks": 0}
    message = (
        f"verified on {n} training examples drawn across the training set: per-example gradients match "
        f"one-example backward passes (largest relative error {worst:.1e}), the batch's loss is the "
        f"{loss_reduction} of the examples' own, and dropping an example moves no other's gradient; in "
        f"{time.perf_counter() - start:.2f} s"
    )
    return check, message


def spot_check(engine: PerSampleGradEngine, module: nn.Module, examples: CheckExamples, loss_reduction: LossReduction,
               step: int) -> None:
    """Check ``engine`` again on fresh ``examples`` at training step ``step``: a loss that starts
    mixing examples after a warm-up, or a model that changes, is caught when it does, not never."""
    try:
        with check_context(module):
            with engine.disabled():
                reference = _reference(module, examples, loss_reduction)
            check_per_sample_grads(engine, module, trainable(module), examples.batch_of, examples.step,
                                   list(range(examples.n)), loss_reduction, reference, check_rtol(module))
    except PerSampleGradientMismatch as err:
        raise type(err)(
            f"At step {step} (a spot check; the start-of-fit check had passed), on fresh training examples: {err} "
            "The loss or the model changed during training (a term switched on after a warm-up, a schedule "
            "on the step or epoch); training stops here."
        ) from err


@contextmanager
def _train_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def _buffers_unchanged(module: nn.Module) -> Iterator[None]:
    """Refuse a model whose floating-point buffers ``training_step`` changes: a buffer updated from
    the data in the forward pass (running statistics) is part of the model and would be released
    without clipping or noise."""
    before = {name: b.detach().clone() for name, b in module.named_buffers() if b.is_floating_point()}
    yield
    changed = [name for name, b in module.named_buffers() if name in before and not torch.equal(before[name], b)]
    if changed:
        raise LossNotPerExample(
            f"training_step changes the floating-point buffer(s) {', '.join(changed[:5])}: a buffer updated from "
            "the training data in the forward pass (running statistics, an exponential moving average of "
            "activations) is released with the model without clipping or noise. Compute such statistics outside "
            "the private training step, or from public data."
        )
