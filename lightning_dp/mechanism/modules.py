"""Layers DP-SGD cannot train as they are, found (and where asked, replaced) in place.

Opacus's ``ModuleValidator.fix`` returns a *copy*, so the Trainer would go on training the
unfixed module; every replacement here happens inside the module the Trainer holds.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


class UnsupportedModuleError(ValueError):
    """The model contains a layer that DP-SGD cannot train as it is."""


def replace_batch_norm(module: nn.Module) -> list[str]:
    """Replace every BatchNorm layer inside ``module`` by a GroupNorm over the same channels,
    in place. Returns the names of the replaced layers.

    ``BatchNorm2d``/``3d`` become ``GroupNorm(gcd(32, C), C)`` (Wu & He's 32 groups);
    ``BatchNorm1d`` becomes ``GroupNorm(1, C)``, since its input is often ``(N, C)`` where any
    finer grouping would normalise single values.
    """
    replaced = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                c = child.num_features
                groups = 1 if isinstance(child, nn.BatchNorm1d) else math.gcd(32, c)
                norm = nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine)
                if child.weight is not None:
                    norm = norm.to(device=child.weight.device, dtype=child.weight.dtype)
                setattr(parent, child_name, norm)
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def unsupported_layers(module: nn.Module) -> list[str]:
    """Describe each layer of ``module`` that DP-SGD cannot train with any engine (layers
    that mix examples or keep statistics of the data), with what to change."""
    problems = []
    for name, m in module.named_modules():
        label = f"{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, _BatchNorm):
            problems.append(
                f"{label}: BatchNorm normalises each example with statistics of the whole batch, so "
                "one example's gradient depends on the others and per-example clipping bounds nothing. "
                "Use GroupNorm/LayerNorm, or pass DPStrategy(replace_batch_norm=True) to swap it for "
                "GroupNorm in place."
            )
        elif isinstance(m, _InstanceNorm) and m.track_running_stats:
            problems.append(
                f"{label}: track_running_stats=True stores running statistics of the private data "
                "outside the DP mechanism. Set track_running_stats=False."
            )
    return problems
