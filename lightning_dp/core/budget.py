"""A budget: what a mechanism may spend, what it has spent, and "may I spend this?".

:class:`Budget` is the privacy accounting every mechanism shares, with no training loop in it:
a target (epsilon at delta, and optionally bounds on membership-inference risk) and the
:class:`~lightning_dp.core.history.PrivacyHistory` of what ran. DP-SGD's
:class:`~lightning_dp.PrivacyBudget` callback plans and stops a Trainer with one; a PMixED
service spends one query at a time from one; a Private Evolution job spends one histogram
release per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from lightning_dp.core.accounting import (
    ACCOUNTANTS,
    AccountantName,
    EpsilonTarget,
    PrivacyTarget,
    calibrate_noise,
    compute_epsilon,
    max_steps,
)
from lightning_dp.core.events import Event
from lightning_dp.core.history import PrivacyHistory

__all__ = ["Budget", "PrivacyBudgetExhausted"]


class PrivacyBudgetExhausted(RuntimeError):
    """A private step, query or release was about to run although the budget allows none."""


class Budget:
    """Targets over a history of mechanism events.

    Args:
        epsilon: the epsilon budget (> 0), or ``None`` for a budget of other targets only.
        delta: the delta at which epsilon is reported and bounded, in (0, 1).
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"`` (:mod:`lightning_dp.core.accounting`).
        targets: further targets that must hold (e.g. the risk targets of
            :mod:`lightning_dp.core.risk`).
        history: the history spent so far (a new, empty one by default).

    Example:
        >>> from lightning_dp.core.events import GaussianRelease
        >>> budget = Budget(epsilon=1.0, delta=1e-5)
        >>> budget.allows(GaussianRelease(15.0), count=10)
        True
        >>> budget.spend(GaussianRelease(15.0), count=10)
        >>> 0 < budget.spent <= 1.0, budget.history.steps
        (True, 10)
    """

    def __init__(
        self,
        epsilon: Optional[float],
        delta: float,
        accountant: AccountantName = "prv",
        targets: Sequence[PrivacyTarget] = (),
        history: Optional[PrivacyHistory] = None,
    ) -> None:
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if epsilon is None and not targets:
            raise ValueError("A budget needs epsilon=... or targets (any combination; all given must hold).")
        self.epsilon = None if epsilon is None else float(epsilon)
        self.delta = float(delta)
        self.accountant: AccountantName = accountant
        self.targets = list(targets)
        self.history = history if history is not None else PrivacyHistory()

    @property
    def all_targets(self) -> list[PrivacyTarget]:
        """The epsilon target (if any) followed by the others."""
        found: list[PrivacyTarget] = [] if self.epsilon is None else [EpsilonTarget(self.epsilon, self.delta, self.accountant)]
        return found + self.targets

    @property
    def spent(self) -> float:
        """Epsilon at ``delta`` of the history so far."""
        return compute_epsilon(self.history, self.delta, self.accountant)

    def values(self, history: Optional[PrivacyHistory] = None) -> dict[str, float]:
        """Each target's value on ``history`` (default: the budget's)."""
        history = self.history if history is None else history
        return {t.name: t.value(history) for t in self.all_targets}

    def allows(self, event: Event, count: int = 1) -> bool:
        """Whether ``count`` more runs of ``event`` keep every target."""
        extended = self.history.with_events(event, count)
        try:
            return all(t.value(extended) <= t.limit for t in self.all_targets)
        except (MemoryError, OverflowError, FloatingPointError):
            return False  # an accountant that cannot answer allows nothing: the safe side

    def spend(self, event: Event, count: int = 1) -> None:
        """Record ``count`` runs of ``event``, or raise :class:`PrivacyBudgetExhausted` (and record
        nothing) if they would break a target. Call it *before* the mechanism runs."""
        if not self.allows(event, count):
            raise PrivacyBudgetExhausted(
                f"The privacy budget ({self.describe()}) does not allow {count} more {type(event).__name__} "
                f"run(s): {self.describe_spent()}."
            )
        self.history.append(event, count)

    def max_steps(self, noise_multiplier: float, sample_rate: float, limit: Optional[int] = None) -> int:
        """How many more DP-SGD steps at ``(noise_multiplier, sample_rate)`` keep every target
        (at most ``limit``)."""
        return max_steps(self.history, noise_multiplier, sample_rate, self.epsilon, self.delta, self.accountant,
                         limit=limit, targets=self.targets)

    def calibrate(self, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier whose ``steps`` more DP-SGD steps at ``sample_rate`` keep
        every target (see :func:`~lightning_dp.core.accounting.calibrate_noise`)."""
        return calibrate_noise(self.history, sample_rate, steps, self.epsilon, self.delta, self.accountant,
                               targets=self.targets)

    def describe(self) -> str:
        """The budget in words, e.g. ``"epsilon=3, delta=1e-05 (prv)"``."""
        parts = [] if self.epsilon is None else [f"epsilon={self.epsilon:g}"]
        parts += [f"{t.name}<={t.limit:g}" for t in self.targets]
        return f"{', '.join(parts)}, delta={self.delta:g} ({self.accountant})"

    def describe_spent(self) -> str:
        """What the history spends, against each target."""
        spent = self.spent
        text = (f"epsilon={spent:.4g} of {self.epsilon:g}" if self.epsilon is not None else f"epsilon={spent:.4g}")
        text += f" (delta={self.delta:g}, {self.accountant}{'' if self.epsilon is not None else ', no epsilon target'})"
        for target in self.targets:
            text += f", {target.name}={target.value(self.history):.4g} of {target.limit:g}"
        return text
