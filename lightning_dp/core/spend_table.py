"""What a planned run will have spent after each of its steps, computed once per plan.

Logging ``dp/epsilon`` and the risk figures on every step must not query an accountant every
step (PRV: 0.15-0.8 s a query here, seconds for large sample rates). A :class:`SpendTable` is
built once when a run is planned: the privacy profile (``dp_accounting``'s PLD, pessimistic,
at a 1e-3 loss grid) at a few steps of the plan, and the Renyi DP bound for every step. Each
figure it gives is an **upper bound**: at a step between two grid points it is the smaller of
the next grid point's figure (the figures only grow with steps) and the RDP bound of that very
step, so it is exact at the grid points and never below the truth in between. The accountant's
own figure for the steps taken (``PrivacyBudget.epsilon_spent``, the report) is computed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lightning_dp.core.accounting import (
    RDP_ORDERS,
    AccountantName,
    compute_epsilon,
    rdp_curve,
    rdp_to_epsilon,
)
from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.risk import PrivacyRisk, privacy_profile

__all__ = ["SpendTable"]

#: Steps of the plan at which the profile is computed (more near the start, where the figures
#: grow fastest), and the PLD grid used there.
_GRID_POINTS = 8
_TABLE_GRID = 1e-3


@dataclass(frozen=True)
class SpendTable:
    """Epsilon (and attack risk) after each step of a planned run.

    Build it with :meth:`build`. ``k`` counts the plan's steps (0: where the plan starts).

    Example:
        >>> table = SpendTable.build(PrivacyHistory(), 1.0, 0.01, steps=1000, delta=1e-5, accountant="prv")
        >>> exact = compute_epsilon([(1.0, 0.01, 1000)], 1e-5)
        >>> abs(table.epsilon(1000) - exact) < 0.02  # at a grid point: the PLD profile's bound
        True
        >>> table.epsilon(0), table.epsilon(500) <= table.epsilon(1000)
        (0.0, True)
    """

    start_rdp: np.ndarray
    step_rdp: np.ndarray
    delta: float
    steps: int
    grid: tuple[int, ...]
    grid_epsilon: tuple[float, ...]
    grid_risk: tuple[Optional[PrivacyRisk], ...] = field(default=())
    exact_rdp: bool = False

    @classmethod
    def build(
        cls,
        history: PrivacyHistory,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: AccountantName = "prv",
        fprs: Sequence[float] = (0.001, 0.01),
        kappa: Optional[float] = None,
        risk: bool = True,
        points: int = _GRID_POINTS,
    ) -> SpendTable:
        """The table for ``history`` followed by ``steps`` steps at ``(noise_multiplier,
        sample_rate)``: about ``points`` profile computations (fewer with ``risk=False`` and the
        ``"rdp"`` accountant, whose bound is exact at every step)."""
        steps = max(int(steps), 0)
        start = rdp_curve(history)
        one = rdp_curve([(noise_multiplier, sample_rate, 1)]) if steps else np.zeros(len(RDP_ORDERS))
        grid = sorted({max(1, math.ceil(steps * (j / points) ** 2)) for j in range(1, points + 1)}) if steps else []
        exact_rdp = accountant == "rdp"
        epsilons: list[float] = []
        risks: list[Optional[PrivacyRisk]] = []
        for k in grid:
            planned = history.extended(noise_multiplier, sample_rate, k)
            profile = privacy_profile(planned, _TABLE_GRID) if (risk or accountant == "prv") else None
            if accountant == "prv":
                assert profile is not None
                epsilons.append(profile.epsilon(delta))
            elif accountant == "gdp":
                epsilons.append(compute_epsilon(planned, delta, "gdp"))  # closed form: cheap
            else:
                epsilons.append(math.inf)  # the RDP bound below is the rdp accountant's figure
            risks.append(profile.risk(sorted(set(fprs)), kappa) if (risk and profile is not None) else None)
        return cls(start, one, float(delta), steps, tuple(grid), tuple(epsilons), tuple(risks), exact_rdp)

    def _next(self, k: int) -> Optional[int]:
        """The index of the first grid point at or after ``k``."""
        i = int(np.searchsorted(np.asarray(self.grid), k, side="left"))
        return i if i < len(self.grid) else None

    def epsilon(self, k: int) -> float:
        """Epsilon at ``delta`` after ``k`` of the plan's steps (an upper bound; beyond the plan:
        the RDP bound)."""
        k = max(int(k), 0)
        if k == 0 and not np.any(self.start_rdp):
            return 0.0
        bound = float(rdp_to_epsilon(self.start_rdp + k * self.step_rdp, self.delta))
        i = self._next(k)
        if self.exact_rdp or i is None:
            return bound
        return min(bound, self.grid_epsilon[i])

    def risk(self, k: int) -> Optional[PrivacyRisk]:
        """The attack-risk bounds after ``k`` of the plan's steps: the next grid point's (they
        only grow with steps); ``None`` when the table was built without risk or ``k`` lies beyond
        the plan."""
        i = self._next(max(int(k), 0))
        return None if i is None or not self.grid_risk else self.grid_risk[i]


def step_curve(history: PrivacyHistory, delta: float, exact: Sequence[tuple[int, float]],
               max_points: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds on epsilon after every step of ``history`` (at most ``max_points`` evenly spaced
    steps), for plots, from the accountant's figures at the ``exact`` ``(step, epsilon)`` points
    and the RDP bound of each step: ``(steps, lower, upper)``. Epsilon only grows with steps, so
    at each step it lies between the figure at the previous exact point and the smaller of the
    next one's and the step's RDP bound."""
    total = history.steps
    steps = np.unique(np.linspace(0, total, min(total, max_points) + 1).round().astype(int))
    curve = np.zeros(len(RDP_ORDERS))
    rdp = np.zeros(len(steps))
    done, i = 0, 0
    for entry in history.entries:
        n, one = entry.count, rdp_curve(PrivacyHistory([]).with_events(entry.event))
        while i < len(steps) and steps[i] <= done + n:
            rdp[i] = rdp_to_epsilon(curve + (steps[i] - done) * one, delta) if steps[i] else 0.0
            i += 1
        curve = curve + n * one
        done += n
    marks = sorted(exact)
    at = np.asarray([m[0] for m in marks])
    values = np.asarray([m[1] for m in marks], dtype=np.float64)
    upper = rdp.copy()
    nxt = np.searchsorted(at, steps, side="left")
    known = nxt < len(at)
    upper[known] = np.minimum(rdp[known], values[nxt[known]])
    prev = np.searchsorted(at, steps, side="right") - 1
    lower = np.where(prev >= 0, values[np.clip(prev, 0, None)] if len(values) else 0.0, 0.0)
    return steps, np.minimum(lower, upper), upper
