"""Differentially private training for any LightningModule.

    trainer = L.Trainer(strategy=DPStrategy(max_grad_norm=1.0),
                        callbacks=[PrivacyBudget(epsilon=3.0, delta=1e-5)])
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__all__ = [
    "CanaryExposure",
    "DPDDPStrategy",
    "DPStrategy",
    "PrivacyAudit",
    "PrivacyBudget",
    "PrivacyBudgetExhausted",
    "causal_lm_loss",
    "replace_batch_norm",
]
__version__ = "0.2.0"

# Where each public name lives. They are imported on first use, so that the command line
# (`python -m lightning_dp epsilon ...`, which imports this package first) answers without
# importing Lightning and torch.
_PUBLIC = {
    "CanaryExposure": "lightning_dp.canary",
    "DPDDPStrategy": "lightning_dp.ddp",
    "DPStrategy": "lightning_dp.strategy",
    "PrivacyAudit": "lightning_dp.audit",
    "PrivacyBudget": "lightning_dp.budget",
    "PrivacyBudgetExhausted": "lightning_dp.budget",
    "causal_lm_loss": "lightning_dp.losses",
    "replace_batch_norm": "lightning_dp.modules",
}

if TYPE_CHECKING:
    from lightning_dp.audit import PrivacyAudit
    from lightning_dp.budget import PrivacyBudget, PrivacyBudgetExhausted
    from lightning_dp.canary import CanaryExposure
    from lightning_dp.ddp import DPDDPStrategy
    from lightning_dp.losses import causal_lm_loss
    from lightning_dp.modules import replace_batch_norm
    from lightning_dp.strategy import DPStrategy


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_dp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


# `Trainer(strategy="dp")` needs the strategies registered with Lightning, which importing them
# does. Do it now, as before, unless this import is the command line being located
# (`python -m lightning_dp`: sys.argv[0] is "-m" until the module is found) and Lightning is
# not loaded anyway.
if sys.argv[:1] != ["-m"] or "lightning" in sys.modules:
    from lightning_dp.ddp import DPDDPStrategy  # noqa: E402, F811
    from lightning_dp.strategy import DPStrategy  # noqa: E402, F811
