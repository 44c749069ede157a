"""Hyper-parameter searches charged once: Papernot and Steinke's private selection.

A search that runs ``K`` trials of one DP algorithm and releases only the best trial (its model
and score) costs far less than ``K`` composed runs when ``K`` itself is random, drawn by the
library from a known distribution before any trial and kept secret (Papernot and Steinke 2022,
"Hyperparameter Tuning with Renyi Differential Privacy", ICLR, Theorem 2). For ``K`` from a
truncated negative binomial ``D(eta, gamma)`` (``eta = 1``: geometric with mean ``1/gamma``), if
each trial is ``(lambda, eps(lambda))``-RDP at every order, the released best trial is
``(lambda, eps'(lambda))``-RDP with

    eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lh) eps(lh) + (1 + eta) log(1/gamma) / lh
                   + log(E[K]) / (lambda - 1),

for any ``lh >= 1`` (minimised here over the grid). A Gaussian base run with ``sigma = 2``
(epsilon 2.17 alone at delta 1e-5) searched with a geometric ``K`` of mean 10 costs 4.32, where
ten composed runs cost 8.08.

What the theorem needs, and what the caller must keep: ``K`` drawn once from fresh randomness
(:meth:`TrialCount.sample`), never redrawn or extended after seeing results; every trial the
same RDP-bounded algorithm (at least as much noise); only the best trial and its score released
(``K``, the other trials and their metrics stay hidden); **the selection score must not read
other private data** (score on a public or on the same protected training set through the
private model only), else the score itself leaks.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lightning_dp.core.events import RenyiCharge

__all__ = ["TrialCount", "best_of_k_curve", "search_charge"]


@dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials ``K``: truncated negative binomial ``D(eta, gamma)``.

    Example:
        >>> count = TrialCount.geometric(mean=10)
        >>> count.eta, count.gamma, round(count.mean, 6)
        (1.0, 0.1, 10.0)
    """

    eta: float
    gamma: float

    def __post_init__(self) -> None:
        if not self.eta > -1:
            raise ValueError(f"eta must be > -1, got {self.eta!r}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma!r}")

    @classmethod
    def geometric(cls, mean: float) -> TrialCount:
        """``K`` geometric on ``{1, 2, ...}`` with the given mean (``eta = 1``)."""
        if not mean > 1:
            raise ValueError(f"A search's mean number of trials must be > 1, got {mean!r}")
        return cls(1.0, 1.0 / float(mean))

    @property
    def mean(self) -> float:
        """``E[K]``."""
        eta, gamma = self.eta, self.gamma
        if eta == 0:
            return (1 / gamma - 1) / math.log(1 / gamma)
        return eta * (1 - gamma) / (gamma * (1 - gamma**eta))

    def sample(self, generator: Optional[np.random.Generator] = None) -> int:
        """Draw ``K`` (from OS entropy unless a generator is given, for tests only)."""
        rng = generator if generator is not None else np.random.default_rng(secrets.randbits(128))
        eta, gamma = self.eta, self.gamma
        if eta == 1:
            return int(rng.geometric(gamma))
        if eta > 0:
            while True:  # numpy counts failures before eta successes: condition on K >= 1
                k = int(rng.negative_binomial(eta, gamma))
                if k >= 1:
                    return k
        # -1 < eta <= 0: walk the pmf, p(k+1)/p(k) = (1 - gamma)(k + eta)/(k + 1).
        u = float(rng.random())
        p = (1 - gamma) / math.log(1 / gamma) if eta == 0 else (1 - gamma) * eta / (gamma**-eta - 1)
        k, cumulative = 1, p
        while cumulative < u:
            if k >= 10**7:  # truncating here would change the distribution the theorem assumes
                raise ValueError(f"TrialCount(eta={eta}, gamma={gamma}) drew more than 10^7 trials: use a larger gamma.")
            p *= (1 - gamma) * (k + eta) / (k + 1)
            k += 1
            cumulative += p
        return k


def best_of_k_curve(trial: Any, orders: Sequence[float], count: TrialCount) -> np.ndarray:
    """The RDP curve (at ``orders``) of releasing the best of ``K ~ count`` trials whose own
    curve is ``trial`` (at the same orders), by Papernot and Steinke's Theorem 2, with ``lh``
    over the grid and 1.

    Example:
        >>> orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
        >>> gaussian = np.array(orders) / (2 * 2.0**2)  # sigma = 2, sensitivity 1
        >>> from lightning_dp.core.rdp_filter import rdp_epsilon
        >>> round(float(rdp_epsilon(best_of_k_curve(gaussian, orders, TrialCount.geometric(10)), orders, 1e-5).min()), 2)
        4.32
    """
    alphas = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(trial, dtype=np.float64)
    eta, gamma = count.eta, count.gamma
    # The lh term: smallest over lh in the grid and lh = 1 (where (1 - 1/lh) eps(lh) vanishes).
    hat = (1 + eta) * (1 - 1 / alphas) * eps + (1 + eta) * math.log(1 / gamma) / alphas
    hat_best = min(float(np.min(hat)), (1 + eta) * math.log(1 / gamma))
    return eps + hat_best + math.log(count.mean) / (alphas - 1)


def search_charge(trial: Any, orders: Sequence[float], count: TrialCount, name: str = "search") -> RenyiCharge:
    """The one charge of a private search: :func:`best_of_k_curve` as a
    :class:`~lightning_dp.core.events.RenyiCharge` at ``orders``."""
    curve = best_of_k_curve(trial, orders, count)
    return RenyiCharge(tuple(float(a) for a in orders), tuple(float(c) for c in curve), name)
