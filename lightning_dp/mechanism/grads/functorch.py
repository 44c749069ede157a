"""Per-sample gradients of the whole ``training_step`` with ``torch.func``.

Each example is run through the user's own ``training_step`` as a batch of one, with the
parameters swapped in functionally, under ``vmap(grad(...))``. Nothing about the model's
layers is guessed, so this is exact where Opacus's per-layer hooks are not: causal attention
(``nn.MultiheadAttention``, ``nn.TransformerEncoder``), position embeddings looked up with
``torch.arange(T)``, recurrent layers, tied weights, token-level losses. The cost: the user's
step also runs once on the real batch without gradients, so ``self.log`` and the returned
output come from the real batch, as in a plain step.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_dp.mechanism.grads.engine import (
    LossReduction,
    Materialized,
    PerExampleGrads,
    PerSampleGradEngine,
    StepFn,
    metrics_kept,
    param_names,
    silenced_logging,
)


def _split_examples(batch: Any, batch_size: int, engine: str) -> tuple[list[Tensor], Any]:
    """The batch's tensors, checked to be split into examples along their first dimension."""
    leaves, spec = tree_flatten(batch)
    for leaf in leaves:
        if not (isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size):
            raise ValueError(
                f"The '{engine}' engine splits a batch into examples along the first dimension of every "
                f"tensor in it, but this batch holds {type(leaf).__name__}"
                f"{tuple(leaf.shape) if isinstance(leaf, Tensor) else ''} for {batch_size} examples. Put "
                "only per-example tensors (batch dimension first) in training batches, or use engine='hooks'."
            )
    return leaves, spec


class _Step(nn.Module):
    """Makes ``step`` callable through ``functional_call`` with the module's parameters swapped.

    Transient: built per call and never stored on the LightningModule (a module holding its
    own wrapper would recurse)."""

    def __init__(self, module: nn.Module, step: StepFn) -> None:
        super().__init__()
        self.m = module
        self.step = step

    def forward(self, batch: Any) -> Tensor:
        return self.step(batch)[1]


class _OneExampleAtATime(PerSampleGradEngine):
    """Engines that run the user's step on each example as a batch of one: exact whatever the
    layers, and whatever the loss reduction (each example's loss is its own). The real batch
    also runs once without gradients, for the step's logs and outputs."""

    def __init__(self) -> None:
        self._module: Optional[nn.Module] = None

    def attach(self, module: nn.Module) -> None:
        self._module = module

    def detach(self) -> None:
        self._module = None

    def compute(
        self, step: StepFn, batch: Any, params: Sequence[nn.Parameter], batch_size: int, loss_reduction: LossReduction
    ) -> tuple[Any, Tensor, PerExampleGrads]:
        module = self._module
        assert module is not None, "engine used before attach()"
        with torch.no_grad():  # the real step: its logs and outputs, as without DP
            output, loss = step(batch)
        leaves, spec = _split_examples(batch, batch_size, self.name)
        with silenced_logging(module), metrics_kept(module):
            grads = self._per_example(module, step, leaves, spec, params, batch_size)
        for p in params:
            p.grad = None
        return output, loss.detach(), Materialized(grads, batch_size)

    @abstractmethod
    def _per_example(
        self, module: nn.Module, step: StepFn, leaves: list[Tensor], spec: Any, params: Sequence[nn.Parameter], n: int
    ) -> list[Optional[Tensor]]:
        """Each example's gradient of its own loss, stacked per parameter."""


class FunctorchEngine(_OneExampleAtATime):
    """``vmap(grad(training_step))`` over the examples of a chunk."""

    name = "functorch"

    def _per_example(
        self, module: nn.Module, step: StepFn, leaves: list[Tensor], spec: Any, params: Sequence[nn.Parameter], n: int
    ) -> list[Optional[Tensor]]:
        names = param_names(module)
        keys = ["m." + names[p] for p in params]
        wrapper = _Step(module, step)

        def example_loss(values: tuple[Tensor, ...], *example: Tensor) -> Tensor:
            one = tree_unflatten([t.unsqueeze(0) for t in example], spec)
            return functional_call(wrapper, dict(zip(keys, values)), (one,))

        values = tuple(p.detach() for p in params)
        grads = vmap(grad(example_loss), in_dims=(None, *[0] * len(leaves)), randomness="different")(values, *leaves)
        return [g.detach() for g in grads]


class LoopEngine(_OneExampleAtATime):
    """One backward pass per example: exact for any model that can run on a single example,
    and the slowest engine. The last resort of ``engine="auto"`` (e.g. ``nn.GRU``, whose
    batching rule ``vmap`` lacks)."""

    name = "loop"

    def _per_example(
        self, module: nn.Module, step: StepFn, leaves: list[Tensor], spec: Any, params: Sequence[nn.Parameter], n: int
    ) -> list[Optional[Tensor]]:
        rows: list[list[Optional[Tensor]]] = []
        for i in range(n):
            one = tree_unflatten([t[i : i + 1] for t in leaves], spec)
            grads = torch.autograd.grad(step(one)[1], list(params), allow_unused=True)
            rows.append([None if g is None else g.detach() for g in grads])
        out: list[Optional[Tensor]] = []
        for j, p in enumerate(params):
            column = [r[j] for r in rows]
            if all(g is None for g in column):
                out.append(None)
            else:
                out.append(torch.stack([torch.zeros_like(p) if g is None else g for g in column]))
        return out
