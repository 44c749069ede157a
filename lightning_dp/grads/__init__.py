"""Per-sample gradients: the engines that compute them and the check that they are right."""

from lightning_dp.grads.check import PerSampleGradientMismatch, check_per_sample_grads
from lightning_dp.grads.engine import ENGINES, PerSampleGradEngine, make_engine
from lightning_dp.grads.functorch import FunctorchEngine, LoopEngine
from lightning_dp.grads.ghost import GhostEngine
from lightning_dp.grads.hooks import OpacusHooksEngine

__all__ = [
    "ENGINES",
    "FunctorchEngine",
    "GhostEngine",
    "LoopEngine",
    "OpacusHooksEngine",
    "PerSampleGradEngine",
    "PerSampleGradientMismatch",
    "check_per_sample_grads",
    "make_engine",
]
