"""Digests that make a saved privacy ledger's integrity checkable.

A checkpoint's ledger is what a resumed run believes it already spent. Edited (a larger
noise multiplier, a smaller sample rate, fewer steps), it would resume and report less than
was spent. Each field of a saved budget state is therefore stored with a digest of its value
and of the run's identity, and a resume that does not verify is refused, naming the field.

What this catches: any edit of the state by a tool or person who does not recompute the
digests (and copying one run's ledger into another run's checkpoint, since the run's identity
is part of each digest). By default the digest is a plain SHA-256, which anyone who knows this
format can recompute; setting the environment variable ``LIGHTNING_DP_LEDGER_KEY`` makes it an
HMAC-SHA256 under that secret, which only holders of the key can produce, and with the key set
a state that is not signed with it is refused. For a record that a run's owner cannot rewrite
at all, keep the dataset's spend off the checkpoint, in a :class:`~lightning_dp.PrivacyLedger`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["KEY_VARIABLE", "seal", "unverified_fields"]

#: The environment variable holding the secret key for HMAC digests (optional).
KEY_VARIABLE = "LIGHTNING_DP_LEDGER_KEY"


def _key() -> bytes | None:
    key = os.environ.get(KEY_VARIABLE)
    return key.encode() if key else None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr).encode()


def _digest(run_id: str, field: str, value: Any, key: bytes | None) -> str:
    message = _canonical([run_id, field, value])
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def seal(fields: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """The digests of ``fields`` for run ``run_id``: ``{"run_id", "signed", "digests"}`` to
    store next to the fields.

    Example:
        >>> sealed = seal({"segments": [[1.0, 0.01, 10]]}, run_id="abc")
        >>> unverified_fields({"segments": [[1.0, 0.01, 10]], **sealed})
        []
        >>> unverified_fields({"segments": [[2.0, 0.01, 10]], **sealed})  # an edited noise multiplier
        ['segments']
    """
    key = _key()
    return {
        "run_id": run_id,
        "signed": key is not None,
        "digests": {name: _digest(run_id, name, value, key) for name, value in fields.items()},
    }


def unverified_fields(state: Mapping[str, Any], required: Iterable[str] = ()) -> list[str]:
    """The fields of ``state`` (written with :func:`seal`'s entries) whose digest does not
    match or is missing for one of ``required``, in sorted order; ``["digests"]`` when the
    state has none, ``["signed"]`` when a key is set but the state was not signed with one
    (or the other way round)."""
    digests = state.get("digests")
    run_id = state.get("run_id")
    if not isinstance(digests, Mapping) or not isinstance(run_id, str):
        return ["digests"]
    key = _key()
    if bool(state.get("signed")) != (key is not None):
        return ["signed"]
    bad = {name for name, digest in digests.items()
           if name not in state or not hmac.compare_digest(str(digest), _digest(run_id, name, state[name], key))}
    bad |= {name for name in required if name not in digests}
    return sorted(bad)
