"""PMixED's members as LoRA adapters of one base model: every member's row of a query in one
batch through one copy of the base, with key-value caches, instead of one full forward per member
per token.

A query at context ``ids`` needs the public model's next-token logits and those of the sampled
members. Here the public model is the base without adapters, and the members are LoRA adapters of
that base, stacked: each adapted ``Linear`` adds ``scale_i B_i A_i x_i`` to row ``i`` of the batch
with two batched matrix products (``torch.bmm``), one per layer whatever the number of members.
(peft's own multi-adapter batches, ``adapter_names=``, loop over the adapters in every layer and
cost this model about as much again as the base forward: 112 ms against 58 ms for four rows of
SmolLM2-135M on 2 CPU cores.) Two key-value caches carry the context: the public model's, advanced
on every query, and the members' (one row per member), advanced only on queries that sample a
member, then over every token since it last moved.

Privacy: a query that samples no member does not run the members at all. A query that samples
some runs every member's row (that is what keeps one cache for all of them) but returns only the
sampled rows; an unsampled member's row never reaches the answer (batch rows are independent;
``tests/test_pmixed.py`` gives an unsampled member NaN weights to show it). Timing is outside the
guarantee: a query that samples no member answers faster, and the members' catch-up grows with
the tokens since they last ran; a service whose response times an attacker can see should pad them.

Example:
    >>> import copy, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    >>> ensemble = LoRAEnsemble([get_peft_model(copy.deepcopy(base), lora) for _ in range(3)])
    >>> public, members = ensemble.logits(torch.tensor([1, 2, 3]), [0, 2])
    >>> tuple(public.shape), tuple(members.shape), len(ensemble)
    ((40,), (2, 40), 3)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["LoRAEnsemble"]


class _StackedLoRALinear(nn.Module):
    """A base ``Linear`` and every member's LoRA update of it, stacked (ranks zero-padded to the
    largest). ``members`` on: row ``i`` of the input gets member ``i``'s update; off: the base."""

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.base = base
        self.a_t: Tensor
        self.b_t: Tensor
        self.register_buffer("a_t", a.transpose(1, 2).contiguous())  # (N, in, r)
        self.register_buffer("b_t", (b * scale[:, None, None]).transpose(1, 2).contiguous())  # (N, r, out)
        self.members = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.members:
            return out
        if x.shape[0] != self.a_t.shape[0]:
            raise RuntimeError(f"a members' batch has one row per member ({self.a_t.shape[0]}), got {x.shape[0]}")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat.to(self.a_t.dtype), self.a_t), self.b_t)
        return out + delta.reshape(out.shape).to(out.dtype)


class _CachedContext:
    """A key-value cache and the tokens it holds."""

    def __init__(self) -> None:
        self.ids: Optional[Tensor] = None
        self.cache: Any = None
        self._pending: Optional[Tensor] = None

    def new_tokens(self, ids: Tensor) -> Tensor:
        """Keep the longest cached prefix of ``ids`` (at least one token is left to run, whose
        logits are the answer) and return the tokens to run. The cache holds ``ids`` only once
        the forward over them succeeded (:meth:`ran`); a failed one empties it (:meth:`failed`)."""
        keep = 0
        if self.ids is not None and self.cache is not None:
            n = min(len(self.ids), len(ids) - 1)
            same = (self.ids[:n] == ids[:n]).to(torch.int8)
            keep = n if bool(same.all()) else int(same.argmin())
        if keep == 0:
            from transformers import DynamicCache

            self.cache = DynamicCache()
        elif keep < len(self.ids):  # type: ignore[arg-type]
            self.cache.crop(keep - len(self.ids))  # type: ignore[arg-type]  # a negative count drops the tail
        self.ids = None  # until the forward has run
        self._pending = ids.clone()
        return ids[keep:]

    def ran(self, cache: Any) -> None:
        self.cache, self.ids = cache, self._pending

    def failed(self) -> None:
        # The forward may have appended some layers' keys and values before failing: start over.
        self.cache, self.ids = None, None


class LoRAEnsemble:
    """The members ``models`` (peft models, each with one LoRA adapter on ``Linear`` layers of the
    same base model) as one stacked model. The members are not changed; a copy of their base is
    made once. A member whose base weights differ from the first's is refused: it is not an
    adapter of the same base (a full fine-tune, another model).

    Args:
        models: the members, in member order.
        cache: keep key-value caches between queries (``False``: a full forward every query).
    """

    def __init__(self, models: Sequence[nn.Module], cache: bool = True) -> None:
        if not models:
            raise ValueError("LoRAEnsemble needs at least one member.")
        layers = [_lora_layers(m, i) for i, m in enumerate(models)]
        reference = _base_weights(models[0])
        for i, member in enumerate(models[1:], start=1):
            if layers[i].keys() != layers[0].keys():
                raise ValueError(f"member {i} adapts other layers than member 0 ({sorted(layers[i])[:3]}... against "
                                 f"{sorted(layers[0])[:3]}...): stack members of one LoRA configuration.")
            weights = _base_weights(member)
            if weights.keys() != reference.keys() or any(not torch.equal(weights[k], reference[k]) for k in weights):
                raise ValueError(f"member {i}'s base weights differ from member 0's: the members must be LoRA "
                                 "adapters of one base model.")
        model = copy.deepcopy(models[0].get_base_model())  # type: ignore[operator]
        self._stacked: list[_StackedLoRALinear] = []
        for name in layers[0]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lora = getattr(parent, child)
            rank = max(layers[i][name][0].shape[0] for i in range(len(models)))
            a = torch.stack([_pad(layers[i][name][0], rank, 0) for i in range(len(models))])
            b = torch.stack([_pad(layers[i][name][1], rank, 1) for i in range(len(models))])
            scale = torch.tensor([layers[i][name][2] for i in range(len(models))], dtype=a.dtype)
            stacked = _StackedLoRALinear(lora.base_layer, a, b, scale)
            setattr(parent, child, stacked)
            self._stacked.append(stacked)
        self.model, self.use_cache, self.num_members = model.eval(), cache, len(models)
        self._public, self._members = _CachedContext(), _CachedContext()

    def __len__(self) -> int:
        return self.num_members

    @torch.no_grad()
    def _run(self, context: _CachedContext, ids: Tensor, members: bool) -> Tensor:
        for layer in self._stacked:
            layer.members = members
        rows = self.num_members if members else 1
        if not self.use_cache:
            return self.model(input_ids=ids.reshape(1, -1).expand(rows, -1), use_cache=False).logits[:, -1]
        new = context.new_tokens(ids)
        try:
            out = self.model(input_ids=new.reshape(1, -1).expand(rows, -1), past_key_values=context.cache,
                             use_cache=True)
        except BaseException:
            context.failed()
            raise
        context.ran(out.past_key_values)
        return out.logits[:, -1]

    def public(self, ids: Tensor) -> Tensor:
        """The public model's next-token logits after ``ids`` (1-D token ids)."""
        return self._run(self._public, ids.reshape(-1), members=False)[0]

    def member_logits(self, ids: Tensor, sampled: Sequence[int]) -> Tensor:
        """The next-token logits of the members ``sampled``, ``(len(sampled), V)``; with none
        sampled, no member runs."""
        rows = list(sampled)
        if not rows:
            return torch.empty(0, 0)
        return self._run(self._members, ids.reshape(-1), members=True)[rows]

    def logits(self, ids: Tensor, sampled: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The public logits and the sampled members' logits for one query."""
        return self.public(ids), self.member_logits(ids, sampled)


def _lora_layers(model: nn.Module, index: int) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{layer name: (A, B, scale)}`` of the active adapter of peft model ``model``; refuses what
    stacking cannot reproduce exactly."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as err:  # pragma: no cover - peft is in the llm extra
        raise ImportError("LoRAEnsemble needs peft: pip install 'lightning-dp[llm]'") from err
    adapter = getattr(model, "active_adapter", None)
    if adapter is None or not hasattr(model, "get_base_model"):
        raise TypeError(f"member {index} is not a peft model (a {type(model).__name__}).")
    config: Any = model.peft_config[adapter]  # type: ignore[index]
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"member {index} also trains whole modules ({config.modules_to_save}): LoRAEnsemble stacks "
                         "LoRA adapters only.")
    out = {}
    base: Any = model.get_base_model  # a method of peft models
    for name, module in base().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear) or adapter in getattr(module, "lora_variant", {}) or module.merged:
            raise ValueError(f"member {index}'s layer {name} is not a plain unmerged LoRA Linear (DoRA, another "
                             "variant, a merged adapter or a non-Linear layer): LoRAEnsemble cannot stack it exactly.")
        lora_bias: Any = getattr(module, "lora_bias", {})
        if getattr(module, "fan_in_fan_out", False) or lora_bias.get(adapter, False):
            raise ValueError(f"member {index}'s layer {name} uses fan_in_fan_out or a LoRA bias: not supported.")
        layer: Any = module
        out[name] = (layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                     float(layer.scaling[adapter]))
    if not out:
        raise ValueError(f"member {index} has no LoRA layer.")
    return out


def _pad(weight: Tensor, rank: int, dim: int) -> Tensor:
    missing = rank - weight.shape[dim]
    if missing == 0:
        return weight
    shape = list(weight.shape)
    shape[dim] = missing
    return torch.cat([weight, weight.new_zeros(shape)], dim=dim)


def _base_weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" not in k}
