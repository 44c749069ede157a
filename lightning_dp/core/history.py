"""A run's history: the mechanisms it ran, in order, as run-length entries of events.

:class:`PrivacyHistory` is what a training run (or a PMixED service, or a synthetic-data job)
has released about its private data. Mechanisms append events to it; accountants turn it into
epsilon; checkpoints save it. Its state is versioned and names each event's kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_dp.core.events import (
    Event,
    NonPrivate,
    NoOp,
    SampledGaussian,
    event_from_dict,
    event_to_dict,
)

__all__ = ["Entry", "PrivacyHistory", "Segment", "sampled_gaussian"]

#: ``(noise_multiplier, sample_rate, steps)``: the sampled-Gaussian view of an entry (the layout
#: of Opacus accountants' ``history``).
Segment = tuple[float, float, int]

#: Version 2 holds typed events; version 1 held bare sampled-Gaussian segments.
_STATE_VERSION = 2


@dataclass(frozen=True)
class Entry:
    """``count`` consecutive runs of one mechanism ``event``."""

    event: Event
    count: int


def sampled_gaussian(noise_multiplier: float, sample_rate: float) -> Event:
    """The event of one DP-SGD step at ``noise_multiplier``: a :class:`SampledGaussian`, or
    :class:`NonPrivate` for no noise and :class:`NoOp` for infinite noise."""
    sigma, q = float(noise_multiplier), float(sample_rate)
    if sigma == 0:
        return NonPrivate(q)
    if math.isinf(sigma) or q == 0:
        return NoOp(q)
    return SampledGaussian(sigma, q)


def _check_segment(segment: Any) -> Segment:
    """``segment`` as ``(noise_multiplier, sample_rate, steps)``, or a ValueError that says
    what a segment is."""
    try:
        parts: tuple[Any, ...] = tuple(segment)
        raw_sigma, raw_q, n = parts
        sigma, q = float(raw_sigma), float(raw_q)
    except (TypeError, ValueError):
        raise ValueError(f"a history is segments (noise_multiplier, sample_rate, steps), got {segment!r}") from None
    if not (sigma >= 0) or not (0 <= q <= 1) or isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(
            f"invalid segment {segment!r}: needs noise_multiplier >= 0, sample_rate in [0, 1] and an integer "
            "steps >= 0"
        )
    return sigma, q, int(n)


class PrivacyHistory:
    """Run-length history of mechanism events, in the order they ran.

    Example:
        >>> h = PrivacyHistory()
        >>> h.record(1.0, 0.01); h.record(1.0, 0.01); h.record(2.0, 0.01)  # DP-SGD steps
        >>> h.segments
        [(1.0, 0.01, 2), (2.0, 0.01, 1)]
        >>> h.steps
        3
        >>> from lightning_dp.core.events import GaussianRelease
        >>> h.append(GaussianRelease(15.0), 2)
        >>> h.entries[-1]
        Entry(event=GaussianRelease(noise_multiplier=15.0), count=2)
    """

    def __init__(self, segments: Optional[Iterable[Union[Segment, Entry]]] = None) -> None:
        self.entries: list[Entry] = []
        for item in segments or ():
            if isinstance(item, Entry):
                self.append(item.event, item.count)
            else:
                sigma, q, n = _check_segment(item)
                self.record(sigma, q, n)

    # ------------------------------------------------------------------ appending
    def append(self, event: Event, count: int = 1) -> None:
        """Append ``count`` runs of ``event`` (merged with the last entry when equal)."""
        if count <= 0:
            return
        if self.entries and self.entries[-1].event == event:
            self.entries[-1] = Entry(event, self.entries[-1].count + int(count))
        else:
            self.entries.append(Entry(event, int(count)))

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append ``steps`` DP-SGD steps (sampled Gaussian) at ``noise_multiplier`` and ``sample_rate``."""
        self.append(sampled_gaussian(noise_multiplier, sample_rate), steps)

    def extended(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyHistory:
        """A copy with ``steps`` more DP-SGD steps (for what-if queries)."""
        copy = self.copy()
        copy.record(noise_multiplier, sample_rate, steps)
        return copy

    def with_events(self, event: Event, count: int = 1) -> PrivacyHistory:
        """A copy with ``count`` more runs of ``event``."""
        copy = self.copy()
        copy.append(event, count)
        return copy

    def copy(self) -> PrivacyHistory:
        out = PrivacyHistory()
        out.entries = list(self.entries)
        return out

    # ------------------------------------------------------------------ reading
    @property
    def steps(self) -> int:
        """The number of mechanism runs recorded (private steps, releases, queries)."""
        return sum(e.count for e in self.entries)

    @property
    def segments(self) -> list[Segment]:
        """The DP-SGD view: ``[(noise_multiplier, sample_rate, steps)]`` (0 for no noise, inf for
        a step that released nothing). Only for histories of DP-SGD steps."""
        out: list[Segment] = []
        for entry in self.entries:
            event = entry.event
            if isinstance(event, SampledGaussian):
                out.append((event.noise_multiplier, event.sample_rate, entry.count))
            elif isinstance(event, NonPrivate):
                out.append((0.0, event.sample_rate, entry.count))
            elif isinstance(event, NoOp):
                out.append((math.inf, event.sample_rate, entry.count))
            else:
                raise ValueError(
                    f"This history holds a {type(event).__name__} event, which has no (noise_multiplier, "
                    "sample_rate, steps) segment: read history.entries."
                )
        return out

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivacyHistory) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"PrivacyHistory({self.entries!r})"

    def prefix(self, count: int) -> PrivacyHistory:
        """The history of the first ``count`` mechanism runs."""
        out = PrivacyHistory()
        for entry in self.entries:
            take = min(entry.count, count - out.steps)
            if take <= 0:
                break
            out.append(entry.event, take)
        return out

    def is_prefix_of(self, other: PrivacyHistory) -> bool:
        """Whether ``other`` is this history followed by zero or more further runs."""
        return other.prefix(self.steps) == self

    def merged(self, other: PrivacyHistory) -> PrivacyHistory:
        """This history combined with ``other`` without ever forgetting a run: the longer of
        the two when one continues the other (a checkpoint and the run resumed from it), both
        composed otherwise."""
        if other.is_prefix_of(self):
            return self.copy()
        if self.is_prefix_of(other):
            return other.copy()
        out = self.copy()
        for entry in other.entries:
            out.append(entry.event, entry.count)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"version", "entries": [{"event": {"kind", ...}, "count"}]}``, plus, for a history of
        DP-SGD steps, the version-1 ``"segments"`` that lightning-dp 0.1 reads."""
        state: dict[str, Any] = {"version": _STATE_VERSION,
                                 "entries": [{"event": event_to_dict(e.event), "count": e.count} for e in self.entries]}
        try:
            state["segments"] = [list(s) for s in self.segments]
        except ValueError:
            pass  # other mechanisms than DP-SGD steps: no version-1 view
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a saved state: version 2 (typed events) or version 1 (``segments`` of DP-SGD steps)."""
        history = PrivacyHistory()
        if "entries" in state:
            version = int(state.get("version", _STATE_VERSION))
            if version > _STATE_VERSION:
                raise ValueError(f"This history was saved in format {version}, newer than this lightning-dp reads "
                                 f"({_STATE_VERSION}): upgrade lightning-dp.")
            for item in state["entries"]:
                history.append(event_from_dict(item["event"]), int(item["count"]))
        elif "segments" in state:
            for sigma, q, n in state["segments"]:
                history.record(float(sigma), float(q), int(n))
        else:
            raise ValueError("Not a privacy history state: it has neither 'entries' nor 'segments'.")
        self.entries = history.entries
