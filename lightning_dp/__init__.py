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
    "PMixED",
    "PrivacyLedger",
    "PrivateEvolution",
    "LoRAEnsemble",
    "PMixEDModule",
    "causal_lm_loss",
    "replace_batch_norm",
    "train_ensemble",
]
from lightning_dp._version import __version__ as __version__

# Where each public name lives. They are imported on first use, so that the command line
# (`python -m lightning_dp epsilon ...`, which imports this package first) answers without
# importing Lightning and torch.
_PUBLIC = {
    "PrivacyLedger": "lightning_dp.core.ledger",
    "PMixED": "lightning_dp.mechanism.pmixed",
    "train_ensemble": "lightning_dp.lightning.ensemble",
    "PrivateEvolution": "lightning_dp.lightning.synthetic",
    "LoRAEnsemble": "lightning_dp.mechanism.lora_ensemble",
    "PMixEDModule": "lightning_dp.lightning.pmixed_module",
    "CanaryExposure": "lightning_dp.lightning.canary",
    "DPDDPStrategy": "lightning_dp.lightning.ddp",
    "DPStrategy": "lightning_dp.lightning.strategy",
    "PrivacyAudit": "lightning_dp.lightning.audit",
    "PrivacyBudget": "lightning_dp.lightning.budget",
    "PrivacyBudgetExhausted": "lightning_dp.lightning.budget",
    "causal_lm_loss": "lightning_dp.mechanism.losses",
    "replace_batch_norm": "lightning_dp.mechanism.modules",
}

if TYPE_CHECKING:
    from lightning_dp.core.ledger import PrivacyLedger
    from lightning_dp.lightning.ensemble import train_ensemble
    from lightning_dp.mechanism.pmixed import PMixED
    from lightning_dp.lightning.synthetic import PrivateEvolution
    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble
    from lightning_dp.lightning.pmixed_module import PMixEDModule
    from lightning_dp.lightning.audit import PrivacyAudit
    from lightning_dp.lightning.budget import PrivacyBudget, PrivacyBudgetExhausted
    from lightning_dp.lightning.canary import CanaryExposure
    from lightning_dp.lightning.ddp import DPDDPStrategy
    from lightning_dp.mechanism.losses import causal_lm_loss
    from lightning_dp.mechanism.modules import replace_batch_norm
    from lightning_dp.lightning.strategy import DPStrategy


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_dp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


def _located_as_command_line() -> bool:
    """Whether this import is ``python -m lightning_dp`` locating its ``__main__`` (sys.argv[0] is
    "-m" until the module is found), not any other ``python -m tool`` that imports us."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] in ("lightning_dp", "lightning_dp.__main__")
        if arg.startswith("-m"):
            return arg[2:] in ("lightning_dp", "lightning_dp.__main__")
    return False


# `Trainer(strategy="dp")` needs the strategies registered with Lightning, which importing them
# does. Do it now, as before, unless this import is our command line being located and
# Lightning is not loaded anyway (the planning commands answer without importing torch).
if not _located_as_command_line() or "lightning" in sys.modules:
    from lightning_dp.lightning.ddp import DPDDPStrategy  # noqa: E402, F811
    from lightning_dp.lightning.strategy import DPStrategy  # noqa: E402, F811
