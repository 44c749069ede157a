"""Empirical privacy auditing in one training run (public): the :class:`PrivacyAudit` callback
(:mod:`lightning_dp.lightning.audit`) and the bound it computes (:mod:`lightning_dp.core.audit_bound`)."""

from lightning_dp.core.audit_bound import audit_p_value, epsilon_lower_bound
from lightning_dp.lightning.audit import AuditResult, PrivacyAudit

__all__ = ["AuditResult", "PrivacyAudit", "audit_p_value", "epsilon_lower_bound"]
