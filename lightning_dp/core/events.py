"""Mechanisms as data: what ran, not what it cost.

Every mechanism that touches private data is recorded as an event: a frozen value that says
which mechanism ran with which parameters. What an event costs is the accountants' business
(:mod:`lightning_dp.core.accounting`), so one ledger can hold DP-SGD steps, Gaussian releases
(Private Evolution's histograms) and Renyi-DP charges (PMixED's queries) alike, and a new
accountant reads old ledgers unchanged. As in ``dp_accounting``, **the meaning of an event
never changes**: a new mechanism is a new event kind.

Events serialise to plain dicts that name their kind (:func:`event_to_dict`,
:func:`event_from_dict`); an unknown kind is refused on load rather than misread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

__all__ = [
    "Event",
    "GaussianRelease",
    "NoOp",
    "NonPrivate",
    "RenyiCharge",
    "SampledGaussian",
    "event_from_dict",
    "event_to_dict",
]


@dataclass(frozen=True)
class SampledGaussian:
    """The Poisson-subsampled Gaussian mechanism: each record joins with probability
    ``sample_rate``, the sum of the records' contributions (each of L2 norm at most 1 after
    clipping and scaling) gets Gaussian noise of standard deviation ``noise_multiplier``. One
    DP-SGD step.

    Example:
        >>> SampledGaussian(1.1, 0.004)
        SampledGaussian(noise_multiplier=1.1, sample_rate=0.004)
    """

    noise_multiplier: float
    sample_rate: float
    kind: ClassVar[str] = "sampled_gaussian"

    def __post_init__(self) -> None:
        _check(self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier),
               f"noise_multiplier must be a finite number > 0 (NonPrivate or NoOp otherwise), got {self.noise_multiplier!r}")
        _check(0 < self.sample_rate <= 1, f"sample_rate must be in (0, 1], got {self.sample_rate!r}")


@dataclass(frozen=True)
class GaussianRelease:
    """The Gaussian mechanism on a query of L2 sensitivity 1, noise of standard deviation
    ``noise_multiplier``, every record included (no sampling): a Private Evolution histogram.

    Example:
        >>> GaussianRelease(15.34).noise_multiplier
        15.34
    """

    noise_multiplier: float
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check(self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier),
               f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")


@dataclass(frozen=True)
class RenyiCharge:
    """A mechanism known only by its Renyi-DP guarantee: ``(orders[i], epsilons[i])``-RDP for
    each ``i`` (a PMixED query, a hyper-parameter search by Papernot and Steinke's theorem). At
    any other order it is charged infinity.

    Example:
        >>> RenyiCharge((3.0,), (0.003,), "pmixed query").epsilon_at(3.0)
        0.003
    """

    orders: tuple[float, ...]
    epsilons: tuple[float, ...]
    name: str = "rdp"
    kind: ClassVar[str] = "renyi"

    def __post_init__(self) -> None:
        object.__setattr__(self, "orders", tuple(float(a) for a in self.orders))
        object.__setattr__(self, "epsilons", tuple(float(e) for e in self.epsilons))
        _check(len(self.orders) == len(self.epsilons) > 0, "orders and epsilons must be non-empty and of equal length")
        _check(all(a > 1 for a in self.orders), f"Renyi orders must be > 1, got {self.orders}")
        _check(all(e >= 0 for e in self.epsilons), f"Renyi epsilons must be >= 0, got {self.epsilons}")

    def epsilon_at(self, order: float) -> float:
        """The charge at ``order`` (infinity where the mechanism gave no guarantee)."""
        for a, e in zip(self.orders, self.epsilons):
            if a == order:
                return e
        return math.inf


@dataclass(frozen=True)
class NonPrivate:
    """A release without noise (``noise_multiplier=0``): no finite epsilon covers it.

    ``sample_rate`` is kept to tell what ran (the rate the batch was drawn with)."""

    sample_rate: float = 1.0
    kind: ClassVar[str] = "non_private"


@dataclass(frozen=True)
class NoOp:
    """A step that released nothing about the data (infinite noise): it costs nothing."""

    sample_rate: float = 1.0
    kind: ClassVar[str] = "no_op"


Event = Union[SampledGaussian, GaussianRelease, RenyiCharge, NonPrivate, NoOp]
_KINDS: dict[str, type] = {cls.kind: cls for cls in (SampledGaussian, GaussianRelease, RenyiCharge, NonPrivate, NoOp)}


def event_to_dict(event: Event) -> dict[str, Any]:
    """``{"kind": ..., field: value, ...}``.

    Example:
        >>> event_to_dict(SampledGaussian(1.0, 0.01))
        {'kind': 'sampled_gaussian', 'noise_multiplier': 1.0, 'sample_rate': 0.01}
    """
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(event).items()}
    return {"kind": event.kind, **fields}


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """The event ``data`` describes; an unknown kind is an error, never a guess."""
    kind = data.get("kind")
    cls = _KINDS.get(str(kind))
    if cls is None:
        raise ValueError(f"Unknown mechanism event kind {kind!r}: this ledger was written by a newer lightning-dp "
                         f"(known kinds: {sorted(_KINDS)}).")
    fields = {k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
              for k, v in data.items() if k != "kind"}
    return cls(**fields)  # type: ignore[no-any-return]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
