"""The run-time check: per-sample gradients are compared, not trusted.

Before the first private step, the engine's per-sample gradients on a few real training
examples are compared with a plain backward pass on each example alone. Any engine that is
wrong for the user's model (Opacus on ``pos_emb(torch.arange(T))``, a parameter used outside a
hooked layer, a loss that is not the mean of per-example losses) is caught here, before it
can train with a guarantee it does not give.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_dp.grads.engine import LossReduction, PerSampleGradEngine, StepFn, param_names

# float32 per-sample gradients from einsum-based samplers differ from autograd at ~1e-6.
RTOL = 1e-3


class PerSampleGradientMismatch(RuntimeError):
    """The engine's per-sample gradients differ from one-example backward passes."""


@contextmanager
def deterministic_layers(module: nn.Module) -> Iterator[None]:
    """Put dropout layers in eval mode: a batch and its one-example slices draw different
    dropout masks, so the comparison would fail on randomness rather than on a wrong gradient."""
    dropouts = [m for m in module.modules() if isinstance(m, _DropoutNd) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()


def check_per_sample_grads(
    engine: PerSampleGradEngine,
    module: nn.Module,
    params: Sequence[nn.Parameter],
    batch_of: Callable[[Sequence[int]], object],
    step: StepFn,
    indices: Sequence[int],
    loss_reduction: LossReduction,
) -> float:
    """Compare ``engine``'s per-sample gradients with one-example backward passes.

    Args:
        engine: the attached engine to check.
        module: the model (named in errors).
        params: the trainable parameters.
        batch_of: builds a device batch from dataset indices.
        step: runs the user's training step on a batch and returns ``(output, loss)``.
        indices: the examples to check on.
        loss_reduction: how the loss reduces over the batch ("mean" or "sum").

    Returns:
        The largest relative error seen.

    Raises:
        PerSampleGradientMismatch: naming the parameters whose gradients differ.
    """
    names = param_names(module)
    n = len(indices)
    with deterministic_layers(module), torch.random.fork_rng(devices=_devices(params)):
        batch = batch_of(indices)
        try:
            _, _, grads = engine.compute(step, batch, params, n, loss_reduction)
            # Each example's gradient, as the DP step would weigh it alone; and its norm.
            per_example = [grads.weighted_sum(torch.eye(n, device=_device(params))[k]) for k in range(n)]
            sq_norms = grads.sq_norms()
        except Exception as err:  # the engine crashing on this model is the check's finding
            raise PerSampleGradientMismatch(
                f"The '{engine.name}' per-sample gradient engine cannot handle this model: it failed on "
                f"a batch of {n} training examples with {type(err).__name__}: {err}"
            ) from err
        reference: list[list[Optional[Tensor]]] = []
        with engine.disabled():
            for i in indices:
                _, loss = step(batch_of([i]))
                grads = torch.autograd.grad(loss, list(params), allow_unused=True)
                reference.append([None if g is None else g.detach() for g in grads])

    def rows(k: int) -> tuple[list[Tensor], list[Tensor]]:
        got = [torch.zeros_like(p) if g is None else g for p, g in zip(params, per_example[k])]
        ref = [torch.zeros_like(p) if g is None else g for p, g in zip(params, reference[k])]
        return got, ref

    worst = 0.0
    bad: dict[str, float] = {}
    scale_hint = {"mean": 0, "sum": 0}
    for k in range(n):
        got, ref = rows(k)
        ref_norm = torch.sqrt(sum((r.double() ** 2).sum() for r in ref)).item()
        tol = RTOL * ref_norm + 1e-8
        for p, g, r in zip(params, got, ref):
            err = (g.double() - r.double()).norm().item()
            rel = err / (ref_norm + 1e-12)
            worst = max(worst, rel)
            if err > tol:
                name = names.get(p, "?")
                bad[name] = max(bad.get(name, 0.0), rel)
        norm_err = abs(sq_norms[k].double().clamp(min=0).sqrt().item() - ref_norm)
        if norm_err > tol:  # the norm the clipping uses must be the gradient's norm
            bad["<per-example gradient norm>"] = max(bad.get("<per-example gradient norm>", 0.0), norm_err / (ref_norm + 1e-12))
        # Would the other loss reduction have matched? (a summed loss read as a mean is off by n)
        for other, factor in (("sum", 1.0 / n), ("mean", float(n))):
            if other != loss_reduction:
                diff = torch.sqrt(sum(((g.double() * factor - r.double()) ** 2).sum() for g, r in zip(got, ref)))
                scale_hint[other] += int(diff.item() <= tol)
    if bad:
        listed = ", ".join(f"{name} (relative error {err:.2g})" for name, err in sorted(bad.items(), key=lambda x: -x[1])[:8])
        hint = ""
        for other, count in scale_hint.items():
            if count == n and n > 1:
                hint = (
                    f" They match if the loss is a {other} over the batch: pass "
                    f"DPStrategy(loss_reduction={other!r})."
                )
        raise PerSampleGradientMismatch(
            f"The '{engine.name}' per-sample gradient engine is wrong for this model: on {n} training "
            f"examples its per-example gradients differ from a backward pass on each example alone "
            f"for {len(bad)} parameter(s): {listed}.{hint} Training with them would not give the "
            "reported privacy guarantee. If training_step is random beyond nn.Dropout layers "
            "(functional dropout, sampling), make it deterministic for the check or pass "
            "DPStrategy(check_per_sample_grads=False) once you have verified the gradients yourself."
        )
    return worst


def _device(params: Sequence[nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _devices(params: Sequence[nn.Parameter]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
