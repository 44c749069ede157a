"""Digests that make a saved privacy ledger's integrity checkable.

A checkpoint's ledger is what a resumed run believes it already spent. Edited (a larger
noise multiplier, a smaller sample rate, fewer steps), it would resume and report less than
was spent. Each field of a saved budget state is therefore stored with a digest of its value
and of the run's identity, and a resume that does not verify is refused, naming the field.

When a checkpoint is written, the state is also *bound* to it (:func:`bind`): a digest of the
state's digests, the checkpoint's global step and a hash of every tensor of its weights. So a
ledger copied whole from another run's checkpoint (with that run's identity and digests) does
not verify next to these weights.

What this catches: any edit of the state, or move of a state between checkpoints, by a tool or
person who does not recompute the digests. By default the digests are plain SHA-256, which
anyone who knows this format can recompute; setting the environment variable
``LIGHTNING_DP_LEDGER_KEY`` makes them HMAC-SHA256 under that secret, which only holders of the
key can produce, and with the key set a state that is not signed with it is refused. What no
digest can catch: deleting the ledger together with the record that training happened (a
model's weights can always be reloaded by hand). For a record that a run's owner cannot rewrite
at all, keep the dataset's spend off the checkpoint, in a dataset ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["KEY_VARIABLE", "bind", "bind_checkpoint", "binding_verifies", "fingerprint", "seal", "unverified_fields"]

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


def fingerprint(tensors: Mapping[str, Any]) -> str:
    """A hash of every tensor in ``tensors`` (a model's ``state_dict``): names, dtypes, shapes
    and bytes."""
    import torch

    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        value = tensors[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(_canonical(value))
    return digest.hexdigest()


def bind(state: Mapping[str, Any], global_step: int, weights: Mapping[str, Any]) -> str:
    """The digest that ties a sealed state to one checkpoint: its digests, the checkpoint's
    ``global_step`` and the :func:`fingerprint` of its weights."""
    message = _canonical([state.get("run_id"), state.get("digests"), int(global_step), fingerprint(weights)])
    key = _key()
    return hashlib.sha256(message).hexdigest() if key is None else hmac.new(key, message, hashlib.sha256).hexdigest()


def binding_verifies(state: Mapping[str, Any], global_step: int, weights: Mapping[str, Any]) -> bool:
    """Whether ``state``'s ``binding`` is the one :func:`bind` gives for this checkpoint."""
    binding = state.get("binding")
    return isinstance(binding, str) and hmac.compare_digest(binding, bind(state, global_step, weights))


def bind_checkpoint(checkpoint: Mapping[str, Any]) -> None:
    """Bind every sealed state among ``checkpoint``'s callback states to the checkpoint as it will
    be written: its ``global_step`` and its ``state_dict``. Run it on the final dictionary, after
    every hook that may still change it (a LoRA module dropping its frozen weights)."""
    states = checkpoint.get("callbacks")
    if not isinstance(states, Mapping):
        return
    for state in states.values():
        if isinstance(state, dict) and "digests" in state and "run_id" in state:
            state["binding"] = bind(state, int(checkpoint.get("global_step", 0)), checkpoint.get("state_dict", {}))
