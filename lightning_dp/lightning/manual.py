"""Manual optimization (``automatic_optimization = False``) under :class:`~lightning_dp.DPStrategy`.

A GAN's ``training_step`` updates a discriminator that reads the private data and a generator
that sees only the discriminator. The user marks which optimizers touch private data
(``DPStrategy(private_optimizers=[...])``, default all); the rules here make a private
optimizer's step the DP-SGD release and nothing else:

* **Private loss.** A loss passed to ``self.manual_backward`` with shape ``(B,)``, ``B`` the
  number of examples in the Poisson draw, is private: entry ``i`` must depend only on example
  ``i`` (and public things: the parameters, generated samples). Each entry's gradient is taken
  exactly by autograd (``is_grads_batched``), for the private optimizers' parameters only: it
  never lands in any ``param.grad``. Several private losses in one draw add up per example
  before clipping (Opacus's pairing of a real row with a fake row).
* **Public loss.** A scalar loss runs the ordinary backward. It must not read the batch.
  While ``training_step`` runs, a ``TorchFunctionMode`` follows every tensor computed from
  the batch's tensors (of any dtype: labels and token ids too; through ``detach`` and
  ``no_grad``; into buffers written in place), and a backward pass of such a tensor other
  than the private one is refused *before* it writes any gradient: ``manual_backward`` of a
  scalar, ``loss.backward()``, ``torch.autograd.backward``. What leaves torch leaves the
  tracking: Python numbers (``.item()``, ``len(batch)``, ``x.shape[0]``). So the generator's
  loss must not use the batch's size or values through them: draw a fixed number of fakes
  (the expected batch size) with public labels.
* **Private step.** ``opt.step()`` on a private optimizer writes
  ``(sum_i clip_C(g_i) + N(0, (sigma C)^2)) / (q N)`` into its parameters' ``.grad``,
  overwriting whatever a public backward left there, records one step in the ledger, then
  steps. Exactly one private step per draw: none, or a second one, is refused (a second
  release of the same draw is not the independent sampled-Gaussian step the accountant
  composes).
* **Empty draw.** ``training_step`` still runs, on an empty batch of the usual structure, so
  the noise-only private step and the generator's steps happen as on any draw.
* **Check.** With ``check_per_sample_grads``, on the first draw of two or more examples the
  batched gradients are compared with one backward pass per entry, and entries are checked not
  to depend on other examples' floating-point inputs (BatchNorm-like cross-talk). The check sees
  that dependence only through gradients: an entry reading other examples through detached
  statistics (``x - x.mean(0).detach()``), integer labels (``bincount``) or ``argmax`` passes
  it. (The automatic path compares against one-example passes and sees those too; here the
  training step steps optimizers, so it cannot be rerun on fewer examples.)

Why one module of about 430 lines: the manual path is one mechanism (per-example losses to
clipped, noised gradients for the private optimizers) and its own check; the strategy routes
to it through :class:`~lightning_dp.lightning.interfaces.StepView` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from lightning_dp.lightning.interfaces import StepView
from lightning_dp.mechanism.grads.check import RTOL, PerSampleGradientMismatch
from lightning_dp.mechanism.grads.engine import Materialized
from lightning_dp.mechanism.sampling import PoissonBatch


# Entries compared one by one in the first-draw check: enough to catch a wrong batched
# gradient or cross-talk, cheap next to a training step.
_CHECK_ROWS = 4

_ONE_PRIVATE_STEP = (
    "Take one private step per training_step (for n_critic discriminator steps per generator step, step the "
    "generator every n_critic-th batch); put the parameters of several private optimizers in one optimizer with "
    "parameter groups; and mark optimizers that never read the data public with DPStrategy(private_optimizers=[...])."
)


class _Draw:
    """What happened on one Poisson draw so far."""

    def __init__(self, batch: PoissonBatch, leaves: list[Tensor], taint: _BatchTaint) -> None:
        self.size = batch.size
        self.sample_rate = batch.sample_rate
        self.expected_size = batch.expected_size
        self.leaves = leaves
        self.taint = taint
        self.grads: dict[nn.Parameter, Tensor] = {}  # per-example, (size, *param.shape), unclipped
        self.private_backwards = 0
        self.released = False
        self.verified = False


_PUBLIC_READS_BATCH = (
    "depends on the training batch, and a backward pass of it would train without clipping or noise. Only "
    "the private loss may read the batch: pass it to self.manual_backward per example, with shape (batch "
    "size,), each entry depending on its own example only (e.g. reduction='none'), and step a private "
    "optimizer with it. A public loss (e.g. the generator's) must not use the batch's tensors, its labels, "
    "or values derived from them: draw its fakes and labels independently of the batch."
)


class _BatchTaint(TorchFunctionMode):
    """Follows which tensors ``training_step`` computes from the Poisson batch, and refuses a
    backward pass of one outside the private path (before it writes any gradient).

    A tensor is *tainted* when it is one of the batch's tensors, the output of an op with a
    tainted input (``detach`` and ops under ``no_grad`` included), or a tensor written in
    place from a tainted one. The DP release is the one declassification: it runs with the
    tracking paused, so the private parameters it moves stay untainted.
    """

    _BACKWARDS = (Tensor.backward, torch.autograd.backward)

    def __init__(self, batch: Any) -> None:
        super().__init__()
        self._tainted: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        for t in _tensors(batch):
            self._tainted[t] = True
        self.paused = False

    def tainted(self, value: Any) -> bool:
        return any(t in self._tainted for t in _tensors(value))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        reads_batch = self.tainted((args, kwargs))
        if reads_batch and func in self._BACKWARDS:
            raise ValueError("A loss given to backward() in training_step " + _PUBLIC_READS_BATCH)
        out = func(*args, **kwargs)
        if reads_batch:
            written = [out]
            name = getattr(func, "__name__", "")
            if args and (name.endswith("_") or name.startswith("__i") or name == "__setitem__"):
                written.append(args[0])  # in place: the first argument now holds batch data
            if "out" in kwargs:
                written.append(kwargs["out"])
            for t in _tensors(written):
                self._tainted[t] = True
        return out


class ManualPrivacy:
    """The per-fit state of DP training under manual optimization (see the module docstring).

    Args:
        step: the strategy's private step (its noise multiplier and history are read at each
            release, since ``PrivacyBudget`` may calibrate or swap them).
        optimizers: the Trainer's optimizers, in ``configure_optimizers`` order.
        private_indices: which of them are private (``None``: all).
        check: run the first-draw check.
    """

    def __init__(
        self,
        step: StepView,
        optimizers: Sequence[torch.optim.Optimizer],
        private_indices: Optional[Sequence[int]],
        check: bool,
    ) -> None:
        if not optimizers:
            raise ValueError("configure_optimizers returned no optimizer: a private optimizer is needed.")
        indices = list(range(len(optimizers))) if private_indices is None else list(private_indices)
        out_of_range = [i for i in indices if i >= len(optimizers)]
        if out_of_range:
            raise ValueError(
                f"DPStrategy(private_optimizers={list(private_indices or [])}) names optimizer(s) {out_of_range}, but "
                f"configure_optimizers returned {len(optimizers)}. Give indices in configure_optimizers' order."
            )
        self._step = step
        self.private = [optimizers[i] for i in indices]
        self.private_params = _params(self.private)
        public = [(i, o) for i, o in enumerate(optimizers) if i not in indices]
        shared = {id(p) for p in self.private_params}
        for i, opt in public:
            if any(id(p) in shared for p in _params([opt])):
                raise ValueError(
                    f"Optimizer {i} is public but shares parameters with a private optimizer: its steps would "
                    "move private parameters outside the DP mechanism. Give each parameter to one optimizer, "
                    f"or mark optimizer {i} private in DPStrategy(private_optimizers=[...])."
                )
        self._to_verify = check
        self._draw: Optional[_Draw] = None

    # ------------------------------------------------------------------ a draw
    def training_step(self, poisson: PoissonBatch, batch: Any, run: Callable[[Any], Any]) -> Any:
        """Run the user's ``training_step`` (through ``run``) on one Poisson draw: ``batch`` is
        the whole draw on the device (an empty batch of the usual structure for an empty draw)."""
        if poisson.split:
            raise RuntimeError("Manual optimization takes each Poisson draw as one batch; it came in chunks.")
        data, leaves = _as_graph_leaves(batch)
        taint = _BatchTaint(data)
        draw = self._draw = _Draw(poisson, leaves, taint)
        try:
            with taint:
                output = run(data)
        finally:
            self._draw = None
        if draw.verified:
            self._to_verify = False
        if draw.private_backwards and not draw.released:
            raise RuntimeError(
                "A per-example loss was passed to manual_backward but no private optimizer stepped after it in "
                "this training_step: that gradient was never released. Step the private optimizer after its "
                "manual_backward, once per batch."
            )
        if not draw.released:
            raise RuntimeError(
                "training_step ended without stepping a private optimizer on this Poisson batch. Under DP every "
                "sampled batch is one private step (the accountant counts one per batch, and skipping depending "
                "on the batch would leak it): call manual_backward(per_example_loss) and opt.step() on the "
                "private optimizer in every training_step, also when the batch is empty. To step it less "
                "often, lower the number of batches (a larger DataLoader batch_size)."
            )
        return output

    def backward(self, loss: Tensor, plain_backward: Callable[[Tensor], None]) -> None:
        """``manual_backward(loss)``: a per-example private loss (its gradients are kept for the
        private step) or a scalar public one (``plain_backward`` runs it as usual)."""
        draw = self._draw
        if draw is None:
            raise RuntimeError(
                "manual_backward was called outside training_step. Under DPStrategy, backward passes belong in "
                "training_step, where the Poisson batch they use is known."
            )
        if loss.ndim == 0:
            if draw.taint.tainted(loss):
                raise ValueError("A scalar loss passed to manual_backward is public, but it " + _PUBLIC_READS_BATCH)
            plain_backward(loss)
            if any(leaf.grad is not None for leaf in draw.leaves):  # a second line, should the tracking miss a path
                raise ValueError("A scalar loss passed to manual_backward is public, but it " + _PUBLIC_READS_BATCH)
            return
        if loss.shape != (draw.size,):
            raise ValueError(
                f"manual_backward got a loss of shape {tuple(loss.shape)}; this Poisson batch has {draw.size} "
                f"examples. A private loss must have shape ({draw.size},): one entry per example, entry i "
                "depending only on example i (use reduction='none'). A loss that does not read the batch (e.g. "
                "the generator's) must be a scalar: reduce it with .mean()."
            )
        params = [p for p in self.private_params if p.requires_grad]
        if draw.released:
            raise RuntimeError(
                "A per-example loss was passed to manual_backward after the private optimizer already stepped on "
                "this Poisson batch: a second private step on one batch is not the independent sampled-Gaussian "
                "step the accountant composes. " + _ONE_PRIVATE_STEP
            )
        step, host, module = self._step, self._step.host, self._step.module
        host.pre_backward(loss)  # Lightning's backward hooks, as loss.backward() has
        loss = host.precision_plugin.pre_backward(loss, module)
        grads = _per_example_grads(loss, params) if draw.size else [None] * len(params)
        if self._to_verify and draw.size >= 2:
            # Every private loss of the first draw of two or more examples is checked.
            worst = _verify(loss, params, grads, draw.leaves)
            draw.verified = True
            check: dict[str, Any] = step.grad_check if isinstance(step.grad_check, dict) else {"engine": "manual"}
            check.update(
                verified=True,
                examples=min(_CHECK_ROWS, draw.size),
                worst_relative_error=max(worst, check.get("worst_relative_error") or 0.0),
                cross_talk_checked=bool(draw.leaves),
            )
            step.grad_check = check
            if draw.leaves:
                rank_zero_info(
                    f"DPStrategy (manual optimization): per-example gradients of the private loss match one "
                    f"backward pass per example (largest relative error {worst:.1e}); no entry depends on another "
                    "example's floating-point inputs."
                )
            else:
                rank_zero_warn(
                    f"DPStrategy (manual optimization): per-example gradients of the private loss match one "
                    f"backward pass per example (largest relative error {worst:.1e}), but the batch holds no "
                    "floating-point tensor, so cross-talk between examples (an entry reading another example, "
                    "e.g. through a batch statistic) could not be checked through gradients. Make sure entry i "
                    "of the private loss reads only example i."
                )
        for p, g in zip(params, grads):
            if g is not None:
                draw.grads[p] = g if p not in draw.grads else draw.grads[p] + g
        draw.private_backwards += 1
        host.precision_plugin.post_backward(loss, module)
        host.post_backward(loss)

    def is_private(self, optimizer: Any) -> bool:
        return any(optimizer is o for o in self.private)

    def release(self, optimizer: Any) -> None:
        """Write the DP release into the private ``optimizer``'s gradients and record the step."""
        draw, step = self._draw, self._step
        if draw is None:
            raise RuntimeError("A private optimizer stepped outside training_step; its gradient would not be private.")
        if draw.released:
            raise RuntimeError(
                f"A second private optimizer step ({type(optimizer).__name__}) on the same Poisson batch: releasing "
                "one batch twice is not the independent sampled-Gaussian step the accountant composes. "
                + _ONE_PRIVATE_STEP
            )
        if draw.size and not draw.private_backwards:
            raise RuntimeError(
                f"The private optimizer {type(optimizer).__name__} stepped without a per-example loss: its gradients "
                "were not clipped per example. Pass the private loss unreduced, shape (batch size,), to "
                "self.manual_backward before opt.step(). If this optimizer never reads the training data, mark it "
                "public: DPStrategy(private_optimizers=[indices of the others])."
            )
        sigma = step.noise_multiplier
        assert sigma is not None
        params = [p for p in self.private_params if p.requires_grad or p in draw.grads]
        mechanism = step.new_mechanism(params)
        # The release is DP: what it writes may be used by anything after it (the tracking pauses).
        draw.taint.paused = True
        try:
            if draw.size:
                mechanism.add(Materialized([draw.grads.get(p) for p in params], draw.size))
            mechanism.release(sigma, draw.expected_size)
        finally:
            draw.taint.paused = False
        released = {id(p) for p in params}
        for p in self.private_params:
            if id(p) not in released:
                p.grad = None  # only the release may move a private parameter
        step.recorded(mechanism, sigma, draw.sample_rate)
        draw.grads.clear()
        draw.released = True


# ---------------------------------------------------------------------- gradients
def _per_example_grads(loss: Tensor, params: Sequence[nn.Parameter]) -> list[Optional[Tensor]]:
    """Each entry of ``loss`` (shape ``(B,)``) differentiated on its own: ``(B, *p.shape)`` per
    parameter, ``None`` for a parameter no entry depends on."""
    if not params:
        return []
    if not loss.requires_grad:
        raise ValueError(
            "The per-example loss passed to manual_backward does not require grad (computed under no_grad, or "
            "detached): it cannot train the private optimizer."
        )
    rows = torch.eye(loss.shape[0], dtype=loss.dtype, device=loss.device)
    try:
        # One vmapped backward: exact per-row gradients (autograd's Jacobian rows).
        grads = torch.autograd.grad(loss, params, rows, retain_graph=True, allow_unused=True, is_grads_batched=True)
    except RuntimeError:
        # An op without a batching rule for its backward: one backward pass per entry instead.
        per_row = [torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True) for i in range(len(rows))]
        grads = tuple(
            None if per_row[0][j] is None else torch.stack([r[j] for r in per_row])  # type: ignore[misc]
            for j in range(len(params))
        )
    return [None if g is None else g.detach() for g in grads]


def _verify(
    loss: Tensor, params: Sequence[nn.Parameter], grads: Sequence[Optional[Tensor]], leaves: list[Tensor]
) -> float:
    """Compare the batched gradients with one backward pass per entry, and check that each
    entry's gradient with respect to the batch's inputs is zero outside its own example."""
    worst = 0.0
    for i in range(min(_CHECK_ROWS, loss.shape[0])):
        ref = torch.autograd.grad(loss[i], list(params) + leaves, retain_graph=True, allow_unused=True)
        ref_params, ref_inputs = ref[: len(params)], ref[len(params) :]
        diff = sq = 0.0
        for g, r in zip(grads, ref_params):
            if g is None and r is None:
                continue
            got = g[i] if g is not None else torch.zeros_like(r)
            want = r if r is not None else torch.zeros_like(got)
            diff += float((got.double() - want.double()).square().sum())
            sq += float(want.double().square().sum())
        err = (diff ** 0.5) / max(sq ** 0.5, 1e-12)
        if not math.isfinite(err) or not math.isfinite(sq):
            raise PerSampleGradientMismatch(
                f"Entry {i} of the private loss passed to manual_backward has a non-finite gradient on its own "
                "(a backward pass of that entry alone gives NaN or inf) while the batch's was computed: the loss "
                "reads statistics of the batch, or the data holds NaN. Each entry must depend on its own example "
                "only and be finite."
            )
        worst = max(worst, err)
        if not (err <= RTOL or diff ** 0.5 <= 1e-9):
            raise PerSampleGradientMismatch(
                f"The batched per-example gradient of entry {i} of the private loss differs from its own backward "
                f"pass (relative error {err:.2e}). Report this with your model; meanwhile avoid in-place or "
                "data-dependent operations in the discriminator."
            )
        for r in ref_inputs:
            if r is None or len(r) != loss.shape[0]:
                continue
            touched = [j for j in range(len(r)) if j != i and torch.count_nonzero(r[j])]
            if touched:
                raise PerSampleGradientMismatch(
                    f"Entry {i} of the private loss passed to manual_backward depends on example {touched[0]} of the "
                    "batch: each entry must depend only on its own example, or clipping does not bound one "
                    "example's influence. Remove layers or losses that mix the batch (BatchNorm, batch means, "
                    "minibatch discrimination)."
                )
    return worst


# ---------------------------------------------------------------------- batches
def _as_graph_leaves(batch: Any) -> tuple[Any, list[Tensor]]:
    """The batch with each floating-point tensor replaced by a copy of a fresh leaf that
    requires grad (a copy, so the user's in-place ops still work), and the leaves: a loss whose
    gradient reaches a leaf read the data."""
    leaves: list[Tensor] = []

    def mark(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t
        leaf = t.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()

    return _map_tensors(batch, mark), leaves


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)({k: _map_tensors(v, fn) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]


def _params(optimizers: Sequence[torch.optim.Optimizer]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
    return list(seen.values())

