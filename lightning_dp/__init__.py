"""Differentially private training for any LightningModule.

    trainer = L.Trainer(strategy=DPStrategy(max_grad_norm=1.0),
                        callbacks=[PrivacyBudget(epsilon=3.0, delta=1e-5)])
"""

from lightning_dp.audit import PrivacyAudit
from lightning_dp.budget import PrivacyBudget, PrivacyBudgetExhausted
from lightning_dp.canary import CanaryExposure
from lightning_dp.ddp import DPDDPStrategy
from lightning_dp.losses import causal_lm_loss
from lightning_dp.strategy import DPStrategy

__all__ = ["CanaryExposure", "DPDDPStrategy", "DPStrategy", "PrivacyAudit", "PrivacyBudget", "PrivacyBudgetExhausted", "causal_lm_loss"]
__version__ = "0.1.0"
