"""The per-sample gradient engines by name: the one place their names live.

The engines implement :class:`~lightning_dp.mechanism.grads.engine.PerSampleGradEngine`
(``engine.py``) and import nothing else here; this registry imports them.
"""

from __future__ import annotations

from lightning_dp.mechanism.grads.engine import LossReduction, PerSampleGradEngine
from lightning_dp.mechanism.grads.functorch import FunctorchEngine, LoopEngine
from lightning_dp.mechanism.grads.ghost import GhostEngine
from lightning_dp.mechanism.grads.hooks import OpacusHooksEngine

__all__ = ["ENGINES", "FAST_ENGINES", "make_engine"]

_ENGINE_TYPES: dict[str, type[PerSampleGradEngine]] = {
    e.name: e for e in (GhostEngine, OpacusHooksEngine, FunctorchEngine, LoopEngine)
}

#: In the order ``engine="auto"`` tries them.
ENGINES: tuple[str, ...] = ("ghost", "hooks", "functorch", "loop")
#: The engines that compute from the batch in one pass; ``auto`` falls back to the others only
#: with a warning that says why.
FAST_ENGINES: tuple[str, ...] = ("ghost", "hooks")


def make_engine(name: str, loss_reduction: LossReduction = "mean") -> PerSampleGradEngine:
    """Build the engine called ``name`` (one of :data:`ENGINES`).

    Example:
        >>> make_engine("ghost").name
        'ghost'
    """
    if name not in _ENGINE_TYPES:
        raise ValueError(f"Unknown per-sample gradient engine {name!r}; choose 'auto' or one of {list(ENGINES)}")
    if name == OpacusHooksEngine.name:
        return OpacusHooksEngine(loss_reduction)
    return _ENGINE_TYPES[name]()
