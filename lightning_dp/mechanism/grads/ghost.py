"""Memory-lean clipping: per-example norms and clipped sums without per-example gradients.

Book-keeping ghost clipping (Li et al. 2022, "Large language models can be strong
differentially private learners"; Bu et al. 2023, "Differentially private optimization on
large models at small cost"). One ordinary backward pass records, for each layer, its input
``a`` and the gradient of its output ``g``. For a Linear layer the example's weight gradient
is ``g_i^T a_i`` (summed over positions), whose squared norm is
``sum((a_i a_i^T) * (g_i g_i^T))``: a ``T x T`` computation instead of a ``d_out x d_in``
matrix per example. Once every example's norm is known, the clipped sum is one matrix
product ``(c * g)^T a``. Conv2d layers are Linear layers over unfolded patches (im2col), and
embeddings work the same way with token equality in place of ``a_i a_i^T``. LayerNorm has a
per-example rule of its own (applied during the backward, which frees its records early); other
layers with an Opacus per-layer sampler (GroupNorm, Conv, ...) fall back to per-example
gradients for that layer only, as do parameters shared between
layers or layers called more than once (their cross terms are not ghost-computable).

This is our own implementation rather than Opacus's ``GradSampleModuleFastGradientClipping``,
which needs a per-example loss vector (LightningModules return a scalar), crashes on a
non-contiguous embedding input (``x[:, :-1]``) and on a token-level loss of shape (B*T,).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
from opacus.grad_sample import GradSampleHooks
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_dp.mechanism.grads.engine import (
    LossReduction,
    PerExampleGrads,
    PerSampleGradEngine,
    PerSampleGradientError,
    StepFn,
    param_names,
)
from lightning_dp.mechanism.grads.ghost_grads import GhostGrads

_GHOST = (nn.Linear, nn.Embedding)
# Marks a call whose output received a gradient the step builds a graph through, or a second
# one (compared by identity).
_TWICE: dict[str, Tensor] = {}


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _ghost_conv(m: nn.Module) -> bool:
    """Conv2d layers the im2col rule covers (one group, explicit zero padding)."""
    return (
        type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    )


def _layer_per_example(m: nn.Module, x: Tensor, g: Tensor, own: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Per-example gradients of one layer's own parameters by ``vmap`` over its examples:
    the fallback for single-input layers with no rule of their own (e.g. LlamaRMSNorm)."""
    values = {k: p.detach() for k, p in own.items()}

    def contribution(v: dict[str, Tensor], xi: Tensor, gi: Tensor) -> Tensor:
        out = functional_call(m, v, (xi.unsqueeze(0),), strict=False)
        return (out * gi.unsqueeze(0)).sum()

    return vmap(grad(contribution), in_dims=(None, 0, 0))(values, x, g)


def _own_trainable(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]


def _per_example(m: nn.Module, x: Tensor, g: Tensor, n: int) -> dict[str, Tensor]:
    """Per-example gradients of a Linear or Embedding layer for one call.

    Ours rather than Opacus's samplers: Opacus's embedding sampler ignores ``padding_idx``
    and gives the padding row a gradient that autograd never does (the check catches it on
    the hooks engine; tests/test_refusals.py shows it)."""
    g3 = g.reshape(n, -1, g.shape[-1])
    if isinstance(m, nn.Linear):
        a = x.reshape(n, -1, x.shape[-1])
        if a.dtype != g3.dtype:  # under autocast: a float32 input (a LayerNorm's), a bf16 output gradient
            common = torch.promote_types(a.dtype, g3.dtype)
            a, g3 = a.to(common), g3.to(common)
        out = {"weight": torch.einsum("nli,nlo->noi", a, g3)}
        if m.bias is not None:
            out["bias"] = g3.sum(dim=1)
        return out
    assert isinstance(m, nn.Embedding)
    ids = x.reshape(n, -1)
    if m.padding_idx is not None:
        g3 = g3 * (ids != m.padding_idx).unsqueeze(-1).to(g3.dtype)
    rows = m.num_embeddings
    flat = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * rows).reshape(-1)
    grad = torch.zeros(n * rows, g3.shape[-1], dtype=g3.dtype, device=g3.device)
    return {"weight": grad.index_add_(0, flat, g3.reshape(-1, g3.shape[-1])).view(n, rows, -1)}


def _layer_norm_per_example(m: nn.LayerNorm, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example gradients of a LayerNorm's weight and bias: the normalised input times the
    output gradient, summed over every dimension but the first and the normalised ones.

    Ours rather than Opacus's sampler, which computes the same sums at 2.4x the cost (a fresh
    product tensor and a generic reduction): 1.9 against 0.8 ms per (64, 64, 128) call, 5 ms of a
    13-layer GPT step."""
    common = torch.promote_types(x.dtype, g.dtype)
    kept = len(m.normalized_shape)
    over = tuple(range(1, g.dim() - kept))
    out = {}
    if m.weight is not None and m.weight.requires_grad:
        normalised = nn.functional.layer_norm(x, m.normalized_shape, eps=m.eps).to(common)
        out["weight"] = normalised.mul_(g.to(common)).sum(dim=over) if over else normalised.mul_(g.to(common))
    if m.bias is not None and m.bias.requires_grad:
        out["bias"] = g.sum(dim=over) if over else g
    return out


class GhostEngine(PerSampleGradEngine):
    """Book-keeping ghost clipping for Linear, Conv2d and Embedding layers, per-layer per-example
    gradients for the other supported layers (ours for LayerNorm, Opacus's samplers for the rest)."""

    name = "ghost"

    def __init__(self) -> None:
        self._module: Optional[nn.Module] = None
        self._handles: list[Any] = []
        self._records: dict[nn.Module, list[list[Any]]] = {}
        self._recording = False
        self._backward = False  # in compute()'s backward pass (not one training_step runs itself)
        self._n = 0  # examples in the chunk being recorded
        self._silenced: list[nn.Parameter] = []  # weights taken out of autograd for one layer call

    def unsupported(self, module: nn.Module) -> list[str]:
        problems = []
        for name, m in module.named_modules():
            if not _own_trainable(m):
                continue
            label = f"{name or '<root>'} ({type(m).__name__})"
            if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse or m.max_norm is not None):
                problems.append(f"{label}: scale_grad_by_freq, sparse and max_norm embeddings have no ghost rule")
            elif isinstance(m, nn.MultiheadAttention) or isinstance(m, nn.modules.rnn.RNNBase):
                problems.append(f"{label}: takes several inputs or has internal state; no per-layer rule")
        return problems

    def attach(self, module: nn.Module) -> None:
        self.detach()
        self._module = module
        for m in module.modules():
            if _own_trainable(m):
                if type(m) is nn.Linear or _is_conv1d(m) or type(m) is nn.Conv2d:
                    self._handles.append(m.register_forward_pre_hook(self._silence))
                    # First among the layer's hooks (users' hooks see trainable weights), and also
                    # when the forward raises: user code may catch the error and call the layer
                    # again, and a checkpoint's recomputation may stop inside the call.
                    self._handles.append(m.register_forward_hook(self._restore_hook, prepend=True, always_call=True))
                self._handles.append(m.register_forward_hook(self._record))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = {}
        self._module = None

    def _silence(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Before a Linear or convolution whose input carries a gradient: its weights out of
        autograd for this call, so the backward computes the input's gradient only. Every
        gradient of these weights is assembled from the recorded input and output gradient; the
        summed weight gradient autograd would also compute is thrown away (about a third of the
        backward's products). The call's output still carries a gradient through its input, so
        it is always recorded. A use of the weights outside the layer's call is in no record,
        as before (autograd's sum was thrown away): the start-of-fit check, one backward pass per
        example, refuses such a model (tests/test_engines.py)."""
        if not self._recording or not torch.is_grad_enabled():
            return
        first = inputs[0] if inputs else None
        if not (isinstance(first, Tensor) and first.requires_grad):
            return  # the weights are the output's only path to a gradient: keep them
        for _, p in _own_trainable(module):
            if p.is_leaf:  # not the non-leaf weights of a torch.func.functional_call
                p.requires_grad_(False)
                self._silenced.append(p)

    def _restore(self) -> None:
        for p in self._silenced:
            p.requires_grad_(True)
        self._silenced = []

    def _restore_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self._restore()

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not self._recording or not torch.is_grad_enabled():
            return None
        if not (isinstance(output, Tensor) and output.requires_grad):
            return None
        n, replaced = self._n, None
        first = inputs[0] if inputs else None
        if (
            n > 1 and isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == 1
            and output.dim() > 0 and output.shape[0] == 1
        ):
            # A layer run once for the whole batch and broadcast over it (Hugging Face's GPT-2
            # looks up its position embeddings with position ids of shape (1, T)): give each
            # example its own (expanded, not copied) view, so autograd keeps each example's output
            # gradient instead of summing them. The forward values are unchanged; should the model
            # use the output in a way that depends on its leading dimension, the start-of-fit check
            # sees the difference and passes this engine over.
            output = replaced = output.expand(n, *output.shape[1:])
            inputs = (first.expand(n, *first.shape[1:]), *inputs[1:])
        record: list[Any] = [[t.detach() if isinstance(t, Tensor) else t for t in inputs], None, None]
        self._records.setdefault(module, []).append(record)

        def keep_grad(grad: Tensor) -> None:
            if not self._backward:
                # training_step's own differentiation (torch.autograd.grad). With create_graph
                # (a gradient penalty) the loss then has gradient terms no recorded output
                # gradient carries: refuse. Without, that gradient is not the loss's: ignore it.
                if torch.is_grad_enabled():
                    record[:] = [None, None, _TWICE]
                return
            if record[1] is not None or record[2] is not None:  # a second gradient in our one backward
                record[:] = [None, None, _TWICE]
                return
            g = record[1] = grad.detach()
            early = self._early(module, record[0], g)
            if early is not None:
                record[:] = [None, None, early]

        output.register_hook(keep_grad)
        return replaced

    def _early(self, module: nn.Module, inputs: list[Any], g: Tensor) -> Optional[dict[str, Tensor]]:
        """A LayerNorm's per-example gradients, computed as soon as its output gradient arrives so
        that its input and output gradient can be freed during the backward (4 MB per LayerNorm
        of a (64, 64, 128) batch, a fifth of a small GPT's peak of live tensors); ``None`` for
        the other layers, and for calls not split by example (``_assemble`` says why)."""
        first = inputs[0] if inputs else None
        if not (
            type(module) is nn.LayerNorm and isinstance(first, Tensor) and first.dim() > 0
            and first.shape[0] == self._n and g.shape[0] == self._n
        ):
            return None
        with torch.no_grad():
            return _layer_norm_per_example(cast(nn.LayerNorm, module), first, g)

    def compute(
        self, step: StepFn, batch: Any, params: Sequence[nn.Parameter], batch_size: int, loss_reduction: LossReduction
    ) -> tuple[Any, Tensor, PerExampleGrads]:
        module = self._module
        assert module is not None, "engine used before attach()"
        self._records = {}
        self._recording = True
        self._n = batch_size
        try:
            output, loss = step(batch)
            # A mean over the chunk scales each example's gradient by 1/n: undo it on the scalar
            # loss, once, rather than on every recorded output gradient afterwards.
            self._backward = True
            (loss * batch_size if loss_reduction == "mean" else loss).backward()
        finally:
            self._backward = False
            self._recording = False
            self._restore()  # a forward that raised between a layer's pre-hook and its hook
        records, self._records = self._records, {}
        received = {p for p in params if p.grad is not None}
        for p in params:
            p.grad = None  # the plain summed gradient is not private: never let it reach a step
        return output, loss.detach(), self._assemble(records, params, received, batch_size)

    def _assemble(
        self,
        records: dict[nn.Module, list[list[Any]]],
        params: Sequence[nn.Parameter],
        received: set[nn.Parameter],
        n: int,
    ) -> GhostGrads:
        module = self._module
        assert module is not None
        names = param_names(module)
        index = {p: i for i, p in enumerate(params)}
        for m, rs in records.items():
            if any(early is _TWICE for _, _, early in rs):
                raise PerSampleGradientError(
                    f"training_step differentiates through a {type(m).__name__} layer itself with create_graph=True "
                    "(e.g. a gradient penalty by torch.autograd.grad): the loss's gradient then has terms the 'ghost' "
                    "engine does not record (it records two gradients for the layer's output). Use engine='functorch' "
                    "or 'loop'."
                )
        calls = {m: [(inputs, g, early) for inputs, g, early in rs if g is not None or early is not None]
                 for m, rs in records.items()}
        uses: dict[nn.Parameter, int] = {}
        for m, cs in calls.items():
            for _, p in _own_trainable(m):
                uses[p] = uses.get(p, 0) + len(cs)
        covered = {p for p, k in uses.items() if k}
        for p in received - covered:
            raise PerSampleGradientError(
                f"Parameter {names.get(p, '?')!r} received a gradient outside any layer the 'ghost' engine "
                "records (a parameter used directly in training_step); it would escape clipping."
            )
        out = GhostGrads(n, len(params))
        for m, cs in calls.items():
            own = {k: p for k, p in _own_trainable(m) if p in index}
            if not cs or not own:
                continue
            for inputs, g, early in cs:
                if early is not None:
                    continue  # split by example in the backward already
                first = inputs[0] if inputs else None
                if g.shape[0] != n or not (isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == n):
                    raise PerSampleGradientError(
                        f"Layer {names.get(next(iter(own.values())), '?').rsplit('.', 1)[0]!r} ({type(m).__name__}) "
                        f"ran on a tensor whose first dimension is not the {n} examples of the chunk "
                        "(e.g. pos_emb(torch.arange(T))); the 'ghost' engine cannot split it per example."
                    )
            single = len(cs) == 1 and all(uses[p] == 1 for p in own.values())
            if single and (type(m) is nn.Linear or _is_conv1d(m) or _ghost_conv(m)):
                (inputs, g, _), = cs
                if _ghost_conv(m):  # im2col: a convolution is a Linear over unfolded patches
                    conv = cast(nn.Conv2d, m)
                    a = nn.functional.unfold(inputs[0], conv.kernel_size, conv.dilation, conv.padding,  # type: ignore[arg-type]
                                             conv.stride).transpose(1, 2)
                    g3 = g.reshape(n, g.shape[1], -1).transpose(1, 2)
                else:
                    a = inputs[0].reshape(n, -1, inputs[0].shape[-1])
                    g3 = g.reshape(n, -1, g.shape[-1])
                if a.dtype != g3.dtype:  # mixed precision: a bf16 activation, a float32 gradient (or back)
                    common = torch.promote_types(a.dtype, g3.dtype)
                    a, g3 = a.to(common), g3.to(common)
                if "weight" in own:
                    weight, length = own["weight"], a.shape[1]
                    if length * length <= a.shape[2] * g3.shape[2]:
                        out.add_linear(index[weight], a, g3, _is_conv1d(m), weight.shape)
                    else:  # many positions, small layer: the gradient itself is smaller
                        spec = "nli,nlo->nio" if _is_conv1d(m) else "nli,nlo->noi"
                        out.add_materialized(index[weight], torch.einsum(spec, a, g3).reshape(n, *weight.shape))
                if "bias" in own:
                    out.add_materialized(index[own["bias"]], g3.sum(dim=1))
            elif single and type(m) is nn.Embedding:
                (inputs, g, _), = cs
                ids = inputs[0].reshape(n, -1)
                g3 = g.reshape(n, -1, g.shape[-1])
                if m.padding_idx is not None:  # the padding row never gets a gradient
                    g3 = g3 * (ids != m.padding_idx).unsqueeze(-1).to(g3.dtype)
                out.add_embedding(index[own["weight"]], ids, g3, m.num_embeddings)
            elif type(m) in _GHOST:  # shared or called twice: sum the per-example gradients
                for inputs, g, _ in cs:
                    for key, gs in _per_example(m, inputs[0], g, n).items():
                        if key in own:
                            out.add_materialized(index[own[key]], gs.to(own[key].dtype))
            elif type(m) is nn.LayerNorm:
                for inputs, g, early in cs:
                    computed = early if early is not None else _layer_norm_per_example(cast(nn.LayerNorm, m), inputs[0], g)
                    for key, gs in computed.items():
                        if key in own:
                            out.add_materialized(index[own[key]], gs.to(own[key].dtype))
            elif type(m) in GradSampleHooks.GRAD_SAMPLERS:
                sampler = GradSampleHooks.GRAD_SAMPLERS[type(m)]
                for inputs, g, _ in cs:
                    for p, gs in sampler(m, [t for t in inputs if isinstance(t, Tensor)], g).items():
                        if p in index:
                            out.add_materialized(index[p], gs.to(p.dtype))
            else:
                for inputs, g, _ in cs:
                    if len(inputs) != 1:
                        raise PerSampleGradientError(
                            f"Layer {type(m).__name__} takes {len(inputs)} inputs; the 'ghost' engine's per-layer "
                            "fallback handles single-input layers only."
                        )
                    for key, gs in _layer_per_example(m, inputs[0], g, own).items():
                        out.add_materialized(index[own[key]], gs.to(own[key].dtype))
        return out
