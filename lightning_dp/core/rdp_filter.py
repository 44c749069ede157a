"""A Renyi-DP privacy filter: when adaptively chosen runs may still spend a dataset's budget.

Runs on one dataset are chosen one after another, each after seeing the earlier ones' results
(a second fine-tune because the first was weak, a search's next trial). Composing their whole
privacy-loss distributions (PLD/PRV) and stopping when the (epsilon, delta) target is crossed is
**not** a valid filter for such adaptively chosen runs (Tran, Koskela, Raisa and Honkela 2026,
"f-Differential Privacy Filters"; Regehr et al. 2026). Renyi DP at a fixed order is:

**Theorem (Renyi filter; Feldman and Zrnic 2021, "Individual Privacy Accounting via a Renyi
Filter", NeurIPS; Lecuyer 2021, "Practical Privacy Filters and Odometers with Renyi Differential
Privacy").** Fix an order ``alpha > 1`` and a capacity ``B``. If mechanisms are chosen
adaptively, each ``(alpha, rho_t)``-RDP given the past, and mechanism ``t`` runs only when
``rho_1 + ... + rho_t <= B``, the whole interaction is ``(alpha, B)``-RDP, hence
``(epsilon, delta)``-DP for ``epsilon = B + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)``
(the conversion of Balle et al. 2020, Theorem 21, that Opacus and dp_accounting use).
Haney et al. 2023 (CCS) extend fixed-order RDP filters to concurrent interactive mechanisms
(several runs at once, a prediction service).

This module ships two rules, fixed when a dataset is created, never after seeing data:

* ``"exists"`` (default): a fixed grid ``Lambda`` of orders; ``delta`` is split evenly over the
  ``k`` orders whose capacity is positive at the full ``delta`` (a set that depends only on
  ``(epsilon, delta, Lambda)``); a charge is admitted when it fits at **some** order. Valid by a
  union bound: for each order, the interaction that refuses as soon as that order overflows is a
  single-order filter, ``(epsilon, delta/k)``-DP; the real interaction coincides with it on the
  transcripts whose first still-fitting order is that one, and the ``k`` parts add up to
  ``(epsilon, delta)``. It adapts to the workload (small orders suit many Gaussian releases,
  large ones DP-SGD) at the price of ``log k`` in ``delta``.
* ``"single"``: one order ``alpha`` for everything, the full ``delta``: the theorem as stated.

What is spent is reported as the rule's epsilon: the smallest over the active orders of the
conversion of the spent curve. A run's own epsilon (PRV, tight) is smaller than what it adds
here: the filter pays for adaptivity and for Renyi DP's looser conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

__all__ = ["LEDGER_ORDERS", "FilterRule", "capacity", "rdp_epsilon"]

#: A compact grid: each order costs ``log k`` in the union bound, so 22 well-spread orders admit
#: more than Opacus's 151 (26 against 23 DP-SGD runs of epsilon 1.2 in an (8, 1e-6) budget).
LEDGER_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 32.0,
    48.0, 64.0,
)

#: Capacities are shrunk by this relative margin: float sums of charges never admit by rounding.
_MARGIN = 1e-12


def capacity(order: float, epsilon: float, delta: float) -> float:
    """The largest RDP at ``order`` that converts to ``(epsilon, delta)``-DP.

    Example:
        >>> round(capacity(10.0, 8.0, 1e-6), 4)
        6.8261
    """
    a = float(order)
    return epsilon - math.log((a - 1) / a) + (math.log(delta) + math.log(a)) / (a - 1)


def rdp_epsilon(curve: Any, orders: Sequence[float], delta: float) -> np.ndarray:
    """Epsilon at ``delta`` of an RDP ``curve`` at each of ``orders`` (the same conversion)."""
    a = np.asarray(orders, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    return c + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)


@dataclass(frozen=True)
class FilterRule:
    """The admission rule of one dataset's budget.

    Args:
        epsilon: the dataset's total epsilon.
        delta: the dataset's total delta.
        orders: the grid of Renyi orders every charge is recorded at.
        rule: ``"exists"`` (some order fits, delta split) or ``"single"`` (one order, full delta).
        order: the order of the ``"single"`` rule.

    Example:
        >>> rule = FilterRule(8.0, 1e-6)
        >>> charge = np.array([a / (2 * 3.0**2) for a in rule.orders])  # a Gaussian release, sigma 3
        >>> rule.admits(np.zeros(len(rule.orders)), charge)
        True
        >>> rule.admits(100 * charge, charge)  # a hundred of them spent already
        False
    """

    epsilon: float
    delta: float
    orders: tuple[float, ...] = LEDGER_ORDERS
    rule: Literal["exists", "single"] = "exists"
    order: Optional[float] = None
    capacities: tuple[float, ...] = field(init=False)
    deltas: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"A dataset's epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"A dataset's delta must be in (0, 1), got {self.delta!r}")
        orders = tuple(float(a) for a in self.orders)
        if not orders or any(a <= 1 for a in orders) or len(set(orders)) != len(orders):
            raise ValueError(f"orders must be distinct Renyi orders > 1, got {self.orders!r}")
        object.__setattr__(self, "orders", orders)
        if self.rule == "single":
            if self.order is None or float(self.order) not in orders:
                raise ValueError(f"rule='single' needs order= one of the grid's orders {orders}, got {self.order!r}")
            deltas = tuple(self.delta if a == float(self.order) else 0.0 for a in orders)
        elif self.rule == "exists":
            useful = [capacity(a, self.epsilon, self.delta) > 0 for a in orders]
            k = max(sum(useful), 1)
            deltas = tuple(self.delta / k if u else 0.0 for u in useful)
        else:
            raise ValueError(f"rule must be 'exists' or 'single', got {self.rule!r}")
        caps = tuple(capacity(a, self.epsilon, d) * (1 - _MARGIN) if d > 0 else -math.inf for a, d in zip(orders, deltas))
        object.__setattr__(self, "deltas", deltas)
        object.__setattr__(self, "capacities", caps)
        if not any(c > 0 for c in caps):
            raise ValueError(
                f"No order of the grid can hold anything of an ({self.epsilon}, {self.delta}) budget: raise epsilon "
                "or add larger orders."
            )

    def admits(self, spent: Any, charge: Any) -> bool:
        """Whether ``charge`` (an RDP curve on :attr:`orders`) may run on top of ``spent``."""
        total = np.asarray(spent, dtype=np.float64) + np.asarray(charge, dtype=np.float64)
        return bool(np.any(total <= np.asarray(self.capacities)))

    def epsilon_spent(self, spent: Any) -> float:
        """The guarantee of what ``spent`` holds, by this rule: the smallest epsilon over the
        orders that hold it, each at its share of delta; ``inf`` past every capacity."""
        total = np.asarray(spent, dtype=np.float64)
        if not np.any(total > 0):
            return 0.0
        best = math.inf
        for a, d, s in zip(self.orders, self.deltas, total):
            if d > 0 and math.isfinite(s):
                best = min(best, float(rdp_epsilon(s, (a,), d)[0]))
        return max(best, 0.0)

    def headroom(self, spent: Any) -> np.ndarray:
        """What still fits at each order (negative where the order is full or inactive)."""
        return np.asarray(self.capacities) - np.asarray(spent, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "orders": list(self.orders), "rule": self.rule,
                "order": self.order}
