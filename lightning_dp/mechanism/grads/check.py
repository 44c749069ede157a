"""The run-time check: per-sample gradients are compared, not trusted.

Before the first private step, on a few real training examples drawn across the whole
training set, the check establishes two things, and refuses to train unless both hold:

1. **The loss is a per-example loss** (whatever the engine). The batch's loss must be the
   mean (or sum) of each example's loss computed alone, and its gradient the mean (or sum)
   of their gradients, all finite. A loss that mixes examples fails here: batch statistics
   (standardising by the batch's std, which is NaN for one example), contrastive losses
   (InfoNCE), a normaliser over the batch's token count (Hugging Face's ``.loss``). No engine
   can train such a loss with per-example clipping, so this is :class:`LossNotPerExample`,
   which ``engine="auto"`` does not pass over.
2. **The engine computes each example's gradient exactly**: its per-example gradients and
   norms equal one-example backward passes, and dropping one example from the batch does not
   move any other example's gradient (cross-talk inside the engine, e.g. Opacus guessing the
   batch dimension of ``pos_emb(torch.arange(T))``). A failure here is specific to the engine
   (:class:`PerSampleGradientMismatch`); ``"auto"`` moves on to the next.

Every comparison treats a non-finite value as a failure: a NaN never passes a tolerance test.
Dropout (``nn.Dropout`` modules, functional dropout and attention dropout) is off during the
check, since a batch and its one-example slices draw different masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from lightning_dp.mechanism.exact import exact_arithmetic
from lightning_dp.mechanism.grads.engine import LossReduction, PerSampleGradEngine, StepFn, clipping_sq_norms, param_names

# float32 per-sample gradients from einsum-based samplers differ from autograd at ~1e-6.
RTOL = 1e-3

#: Builds a device batch from positions in the check's list of examples.
BatchOf = Callable[[Sequence[int]], object]


class PerSampleGradientMismatch(RuntimeError):
    """The engine's per-sample gradients differ from one-example backward passes."""


class LossNotPerExample(PerSampleGradientMismatch):
    """``training_step``'s loss is not a mean (or sum) of per-example losses: no engine can
    clip it per example."""


_NOT_PER_EXAMPLE_FIX = (
    " DP-SGD bounds each example's influence by clipping its own gradient, so training_step must return "
    "the mean (or, with DPStrategy(loss_reduction='sum'), the sum) over the batch of losses that each depend "
    "on one example only. Remove batch statistics (a mean/std over the batch, BatchNorm), contrastive terms "
    "between examples, and normalisers over the whole batch (e.g. Hugging Face's `model(**batch).loss` "
    "averages tokens over the batch: use lightning_dp.causal_lm_loss(logits, labels) instead)."
)


@dataclass(frozen=True)
class Reference:
    """What the user's loss gives on the check's usable examples with plain autograd."""

    positions: list[int]  # the usable examples, as positions in the check's list
    grads: list[list[Tensor]]  # per usable example, per parameter (zeros where unused)
    norms: list[float]
    losses: list[float]
    batch_grad: list[Tensor]
    batch_loss: float
    skipped: int  # examples whose loss is not finite, alone and in a batch (dropped in training)

    @property
    def n(self) -> int:
        return len(self.positions)


@contextmanager
def no_dropout(module: nn.Module) -> Iterator[None]:
    """Turn off every kind of dropout: ``nn.Dropout`` modules (eval mode), and the functional
    dropouts and attention dropout that models call with a rate read from a config (Hugging
    Face's attention calls ``scaled_dot_product_attention(..., dropout_p=...)`` while in
    training mode). A batch and its one-example slices would otherwise draw different masks,
    and the comparison would fail on randomness rather than on a wrong gradient."""
    dropouts = [m for m in module.modules() if isinstance(m, _DropoutNd) and m.training]
    for m in dropouts:
        m.eval()
    try:
        with _NoFunctionalDropout():
            yield
    finally:
        for m in dropouts:
            m.train()


#: Kept for callers of the old name.
deterministic_layers = no_dropout


class _NoFunctionalDropout(TorchFunctionMode):
    _RATE_ARGS = {
        torch.nn.functional.dropout: 1, torch.nn.functional.dropout1d: 1, torch.nn.functional.dropout2d: 1,
        torch.nn.functional.dropout3d: 1, torch.nn.functional.alpha_dropout: 1,
        torch.nn.functional.feature_alpha_dropout: 1, torch.dropout: 1, torch.alpha_dropout: 1,
        torch.feature_dropout: 1, torch.feature_alpha_dropout: 1,
    }

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self._RATE_ARGS:
            return args[0]  # dropout with rate 0: the identity
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


# The check verifies how an engine splits gradients by example, which does not depend on the
# precision of float32 products: with set_float32_matmul_precision("medium"), which Lightning
# suggests on GPUs with tensor cores (bf16 products on CPUs with AMX), every engine and the
# reference differed by ~2e-3 and each was refused as "wrong for this model".
@exact_arithmetic()
def reference_grads(
    params: Sequence[nn.Parameter],
    batch_of: BatchOf,
    step: StepFn,
    n: int,
    loss_reduction: LossReduction,
    names: dict[nn.Parameter, str],
    rtol: float = RTOL,
    min_examples: int = 2,
) -> Reference:
    """The user's loss with plain autograd (no engine attached): each of the ``n`` examples
    alone, and the batch of the usable ones.

    An example whose loss alone is not finite is *unusable* when its loss is not finite in a
    batch either (NaN or inf data: training drops it); if it is finite in a batch, the loss reads
    the batch, and that is refused. The rest must be at least ``min_examples`` (2, so that
    mixing can be seen; 1 only where training never puts two examples in one batch).

    Raises:
        LossNotPerExample: unless the batch's loss and gradient are the ``loss_reduction`` of
            the examples' own, all finite.
    """
    params = list(params)
    grads: list[Optional[list[Tensor]]] = []
    losses: list[float] = []
    for i in range(n):
        try:
            _, loss = step(batch_of([i]))
            row = torch.autograd.grad(loss, params, allow_unused=True)
        except Exception as err:
            raise LossNotPerExample(
                f"training_step fails on a batch of one example ({type(err).__name__}: {err}). The per-sample "
                "gradient check compares each engine with one backward pass per example, and DP-SGD's per-example "
                "clipping needs a loss defined for each example alone." + _NOT_PER_EXAMPLE_FIX
            ) from err
        if loss.numel() != 1:
            raise LossNotPerExample(
                f"training_step returned a loss of shape {tuple(loss.shape)}; it must be a scalar (the batch's "
                "mean or sum of per-example losses)."
            )
        grads.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, row)])
        losses.append(float(loss.detach().double()))
    finite = [i for i in range(n) if math.isfinite(losses[i]) and math.isfinite(_norm(grads[i] or []))]
    odd = [i for i in range(n) if i not in finite]
    skipped = 0
    for i in odd:
        # Non-finite alone: bad data (non-finite in a batch too), or a loss that reads the batch?
        partner = finite[:1] if finite else [j for j in odd if j != i][:1]
        if partner:
            _, paired = step(batch_of([i, *partner]))
            paired_grad = torch.autograd.grad(paired, params, allow_unused=True)
            in_batch = math.isfinite(float(paired.detach().double())) and math.isfinite(
                _norm([g for g in paired_grad if g is not None])
            )
        if not partner or not in_batch:
            skipped += 1
            continue
        raise LossNotPerExample(
            f"On a training example, the loss of the example alone (a batch of one) is "
            f"{_describe(losses[i], _norm(grads[i] or []))}, while the loss of a batch holding it is finite: "
            "the loss reads statistics of the batch (e.g. a standard deviation over the batch, NaN for one "
            "example), so an example's gradient depends on the others." + _NOT_PER_EXAMPLE_FIX
        )
    if len(finite) < min_examples:
        raise LossNotPerExample(
            f"The per-sample gradient check needs {min_examples} training examples whose loss is finite, but of the "
            f"{n} it drew, {len(finite)} had one ({skipped} give NaN or inf alone and in a batch). Check that "
            "training_step returns finite losses on your data (missing values, log of 0)."
        )
    usable = [grads[i] for i in finite]
    _, batch_loss = step(batch_of(finite))
    batch_grad = [
        torch.zeros_like(p) if g is None else g.detach()
        for p, g in zip(params, torch.autograd.grad(batch_loss, params, allow_unused=True))
    ]
    norms = [_norm(row) for row in usable]  # type: ignore[arg-type]
    kept = [losses[i] for i in finite]
    ref = Reference(finite, usable, norms, kept, batch_grad, float(batch_loss.detach().double()), skipped)  # type: ignore[arg-type]
    m = len(finite)
    if m < 2:
        return ref
    # The batch's gradient against the examples' own, summed and averaged: is the loss additive,
    # and with which reduction?
    summed: list[Any] = [sum(row[k] for row in usable) for k in range(len(params))]  # type: ignore[index,misc]
    total = sum(norms)
    factor = 1.0 / m if loss_reduction == "mean" else 1.0
    other_factor = 1.0 if loss_reduction == "mean" else 1.0 / m
    want = _dist(summed, batch_grad, factor)
    other = _dist(summed, batch_grad, other_factor)
    tol, other_tol = rtol * factor * total + 1e-8, rtol * other_factor * total + 1e-8
    if not (math.isfinite(ref.batch_loss) and math.isfinite(want)):
        raise LossNotPerExample(
            f"On a batch of {m} training examples whose losses are each finite alone, the batch's loss or gradient "
            f"is not finite ({_describe(ref.batch_loss, _norm(batch_grad))}): the loss mixes examples."
            + _NOT_PER_EXAMPLE_FIX
        )
    if want > tol and other <= other_tol:
        declared, actual = loss_reduction, "sum" if loss_reduction == "mean" else "mean"
        raise LossNotPerExample(
            f"training_step's loss is the {actual} of per-example losses over the batch, but DPStrategy was told "
            f"loss_reduction={declared!r}. Pass DPStrategy(loss_reduction={actual!r}) (or return the {declared} "
            "of the per-example losses): read as a mean, a sum would be clipped n times too large."
        )
    loss_off = abs(ref.batch_loss - factor * sum(kept))
    loss_tol = rtol * factor * sum(abs(v) for v in kept) + 1e-6
    if want > tol or loss_off > loss_tol:
        worst = _worst_params(batch_grad, summed, factor, params, names)
        raise LossNotPerExample(
            f"training_step's loss is not the {loss_reduction} of per-example losses: on {m} training examples "
            f"drawn across the training set, the batch's loss is {ref.batch_loss:.6g} while the {loss_reduction} "
            f"of each example's loss alone is {factor * sum(kept):.6g}, and the batch's gradient differs from the "
            f"{loss_reduction} of their gradients by {want / (factor * total + 1e-12):.2g} (relative; most in "
            f"{worst}). The loss mixes examples." + _NOT_PER_EXAMPLE_FIX
        )
    return ref


@exact_arithmetic()  # see reference_grads
def check_per_sample_grads(
    engine: PerSampleGradEngine,
    module: nn.Module,
    params: Sequence[nn.Parameter],
    batch_of: BatchOf,
    step: StepFn,
    indices: Sequence[int],
    loss_reduction: LossReduction,
    reference: Optional[Reference] = None,
    rtol: float = RTOL,
) -> float:
    """Compare ``engine``'s per-sample gradients with one-example backward passes, and check
    that dropping an example from the batch moves no other example's gradient.

    Args:
        engine: the attached engine to check.
        module: the model (named in errors).
        params: the trainable parameters.
        batch_of: builds a device batch from positions ``0..n-1`` in the check's examples.
        step: runs the user's training step on a batch and returns ``(output, loss)``.
        indices: the positions to check on (``range(n)``).
        loss_reduction: how the loss reduces over the batch ("mean" or "sum").
        reference: the plain-autograd :func:`reference_grads`, computed once for every
            engine tried; computed here (with the engine disabled) when not given.
        rtol: the relative tolerance (float32 arithmetic: ``RTOL``; looser for 16-bit parameters).

    Returns:
        The largest relative error seen (finite: any non-finite value fails the check).

    Raises:
        LossNotPerExample: the loss itself is not per example (no engine can fix that).
        PerSampleGradientMismatch: the engine's gradients are wrong for this model.
    """
    names = param_names(module)
    params = list(params)
    with no_dropout(module), torch.random.fork_rng(devices=_devices(params)):
        if reference is None:
            with engine.disabled():
                reference = reference_grads(params, batch_of, step, len(indices), loss_reduction, names, rtol)
        positions, n = reference.positions, reference.n
        per_example, sq_norms, grouping = _engine_grads(engine, step, batch_of, positions, params, loss_reduction)
        dropped: Optional[list[list[Tensor]]] = None
        if n >= 2:
            # Cross-talk inside the engine: the others' gradients without the last example.
            dropped, _, _ = _engine_grads(engine, step, batch_of, positions[:-1], params, loss_reduction, groups=False)

    worst = 0.0
    bad: dict[str, float] = {}
    scale_hint = {"mean": 0, "sum": 0}

    def flag(name: str, rel: float) -> None:
        bad[name] = max(bad.get(name, 0.0), rel) if math.isfinite(rel) else math.inf

    for k in range(n):
        got, ref = per_example[k], reference.grads[k]
        ref_norm = reference.norms[k]
        tol = rtol * ref_norm + 1e-8
        for p, g, r in zip(params, got, ref):
            err = _dist([g], [r], 1.0)
            rel = err / (ref_norm + 1e-12)
            if not err <= tol:  # NaN fails too
                flag(names.get(p, "?"), rel)
            elif rel > worst:
                worst = rel
        # The norm the clipping uses must not be below the gradient's (above is the safe side: an
        # engine may clip with an upper bound that absorbs its rounding, as the ghost norms do).
        used = float(sq_norms[k])
        short = ref_norm - math.sqrt(max(used, 0.0)) if math.isfinite(used) else math.inf
        if not short <= tol:
            flag("<per-example gradient norm>", short / (ref_norm + 1e-12))
        if dropped is not None and k < n - 1:
            moved = _dist(dropped[k], got, 1.0)
            if not moved <= tol:
                flag("<cross-talk: dropping another example moved this one's gradient>", moved / (ref_norm + 1e-12))
        # Would the other loss reduction have matched? (a summed loss read as a mean is off by n)
        for other, factor in (("sum", 1.0 / n), ("mean", float(n))):
            if other != loss_reduction and _dist(got, ref, factor) <= tol:
                scale_hint[other] += 1
    if bad:
        listed = ", ".join(
            f"{name} (relative error {err:.2g})" for name, err in sorted(bad.items(), key=lambda x: -x[1])[:8]
        )
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
            "reported privacy guarantee. If training_step is random beyond dropout "
            "(sampling, augmentation inside the step), make it deterministic for the check or pass "
            "DPStrategy(check_per_sample_grads=False) once you have verified the gradients yourself."
        )
    if grouping is not None:
        _check_groups(engine.name, params, per_example, *grouping)
    return worst


def _check_groups(name: str, params: list[nn.Parameter], per_example: list[list[Tensor]], units: list[int],
                  group_rows_: list[list[Optional[Tensor]]], group_sq: Tensor) -> None:
    """User-level privacy clips the sum of a user's examples' gradients: the engine's grouping
    (ghost clipping packs a user's positions side by side) must give those sums, and norms not
    below theirs, on this model."""
    start = 0
    for u, n_u in enumerate(units):
        want = [torch.stack([per_example[start + j][i] for j in range(n_u)]).sum(0) for i in range(len(params))]
        got = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, group_rows_[u])]
        scale = _norm(want)
        if not _dist(got, want, 1.0) <= RTOL * 10 * scale + 1e-8:
            raise PerSampleGradientMismatch(
                f"The '{name}' engine's per-user gradients (examples grouped into users) are not the sums of its "
                "per-example gradients on this model; user-level clipping would be wrong."
            )
        if not math.sqrt(max(float(group_sq[u]), 0.0)) >= scale * (1 - RTOL * 10) - 1e-8:
            raise PerSampleGradientMismatch(
                f"The '{name}' engine's per-user clipping norm is below the norm of the user's summed gradient on this "
                "model; user-level clipping would let a user through unclipped."
            )
        start += n_u


def _engine_grads(
    engine: PerSampleGradEngine,
    step: StepFn,
    batch_of: BatchOf,
    positions: list[int],
    params: list[nn.Parameter],
    loss_reduction: LossReduction,
    groups: bool = True,
) -> tuple[list[list[Tensor]], Tensor, Any]:
    m = len(positions)
    try:
        _, _, grads = engine.compute(step, batch_of(positions), params, m, loss_reduction)
        eye = torch.eye(m, device=_device(params))
        rows = [grads.weighted_sum(eye[k]) for k in range(m)]
        sq_norms = clipping_sq_norms(grads).detach().double().cpu()
        units = [2] * (m // 2) + [1] * (m % 2)
        grouped = grads.grouped(units) if groups and m >= 2 else None
        if grouped is not None:
            eye_u = torch.eye(len(units), device=_device(params))
            group_rows_ = [grouped.weighted_sum(eye_u[u]) for u in range(len(units))]
            group_sq = clipping_sq_norms(grouped).detach().double().cpu()
    except Exception as err:  # the engine crashing on this model is the check's finding
        raise PerSampleGradientMismatch(
            f"The '{engine.name}' per-sample gradient engine cannot handle this model: it failed on "
            f"a batch of {m} training examples with {type(err).__name__}: {err}"
        ) from err
    per_example = [[torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, row)] for row in rows]
    grouping = None if grouped is None else (units, group_rows_, group_sq)
    return per_example, sq_norms, grouping


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _dist(a: Sequence[Tensor], b: Sequence[Tensor], factor: float) -> float:
    """``||factor * a - b||`` over all tensors (NaN if any value is not finite)."""
    total = 0.0
    for x, y in zip(a, b):
        total += float((x.double() * factor - y.double()).square().sum())
    return math.sqrt(total) if total >= 0 else math.nan


def _worst_params(
    batch: list[Tensor], summed: list[Tensor], factor: float, params: list[nn.Parameter], names: dict[nn.Parameter, str]
) -> str:
    errors = sorted(
        ((_dist([s], [b], factor), names.get(p, "?")) for p, b, s in zip(params, batch, summed)), reverse=True
    )
    return ", ".join(name for _, name in errors[:3])


def _describe(loss: float, norm: float) -> str:
    if not math.isfinite(loss):
        return f"{loss} (loss)"
    return f"finite ({loss:.4g}) with a gradient norm of {norm}"


def _device(params: Sequence[nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _devices(params: Sequence[nn.Parameter]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
