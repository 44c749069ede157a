"""Privacy risk in attack terms (public): the bounds on membership inference and
reconstruction that a run's privacy profile implies. The implementation is
:mod:`lightning_dp.core.risk`."""

from lightning_dp.core.risk import (
    AdvantageTarget,
    PrivacyProfile,
    PrivacyRisk,
    TprTarget,
    epsilon_delta_risk,
    privacy_profile,
    privacy_risk,
    risk_targets,
    tpr_bound,
)

__all__ = [
    "AdvantageTarget",
    "PrivacyProfile",
    "PrivacyRisk",
    "TprTarget",
    "epsilon_delta_risk",
    "privacy_profile",
    "privacy_risk",
    "risk_targets",
    "tpr_bound",
]
