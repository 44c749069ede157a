"""What :class:`~lightning_dp.PrivacyBudget` saves in a checkpoint, and the rules a resume must pass.

The state is each field with a digest of its value and of the run's identity
(:mod:`lightning_dp.core.integrity`), bound to the checkpoint's step and weights when the
checkpoint is written. :class:`ResumeRules` decides what a resume may load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.integrity import KEY_VARIABLE, bind, binding_verifies, seal, unverified_fields
from lightning_dp.core.risk import AdvantageTarget, TprTarget, risk_targets

__all__ = ["ResumeRules", "is_legacy", "sealed", "steps_trained"]

#: Version 2 added the run's identity and the per-field digests.
STATE_VERSION = 2
SEALED_FIELDS = ("history", "epsilon", "delta", "accountant", "max_advantage", "max_tpr_at_fpr", "kappa",
                 "noise_multiplier", "safety_checks", "ledger_verified")


def sealed(fields: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The state to save: the fields, the format's version, and their digests."""
    return {"version": STATE_VERSION, **fields, **seal(fields, run_id)}


def is_legacy(state: Mapping[str, Any]) -> bool:
    """A state in lightning-dp 0.1's format (no version, no digests)."""
    return "digests" not in state and "version" not in state


def verify_fields(state: Mapping[str, Any]) -> None:
    bad = unverified_fields(state, required=SEALED_FIELDS)
    if bad:
        raise ValueError(
            f"The checkpoint's PrivacyBudget ledger does not verify: field(s) {', '.join(map(repr, bad))} do not "
            "match the digest written with them (edited after the run saved them, or signed with another "
            f"{KEY_VARIABLE}). Resuming would report a spend that is not the one the run made, so it is refused. "
            "Resume from an unmodified checkpoint."
        )


def bind_to_checkpoint(state: dict[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """Tie a sealed state to the checkpoint being written: its step and its weights."""
    if "digests" in state:
        state["binding"] = bind(state, int(checkpoint.get("global_step", 0)), checkpoint.get("state_dict", {}))


def steps_trained(checkpoint: Mapping[str, Any], automatic_optimization: bool) -> int:
    """The private steps the checkpoint's model was trained for. With manual optimization
    ``global_step`` counts every optimizer's steps (a GAN's generator too) while the strategy
    takes one private step per batch, so it is the batches trained."""
    global_step = int(checkpoint.get("global_step", 0))
    if not automatic_optimization:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        global_step = int(progress.get("total", {}).get("completed", global_step))
    return global_step


def history_steps(state: Mapping[str, Any]) -> int:
    history = PrivacyHistory()
    history.load_state_dict(state["history"])
    return history.steps


@dataclass(frozen=True)
class ResumeRules:
    """What a resume may load.

    Args:
        allow_unverified: accept a ledger that cannot be verified (written by lightning-dp 0.1,
            or whose checkpoint's weights or step changed), with a warning, instead of refusing it.
    """

    allow_unverified: bool = False

    def check_checkpoint(self, state: Optional[Mapping[str, Any]], checkpoint: Mapping[str, Any],
                         automatic_optimization: Optional[bool]) -> bool:
        """Refuse a checkpoint whose steps the ledger does not cover (unless
        ``automatic_optimization`` is ``None``: unknown, as to the report command), or whose ledger
        does not verify against it. Returns whether the ledger verified (``False``: accepted
        unverified)."""
        trained = 0 if automatic_optimization is None else steps_trained(checkpoint, automatic_optimization)
        recorded = 0 if state is None else history_steps(state)
        if recorded < trained:
            raise ValueError(
                f"The checkpoint was trained for {trained} steps but its PrivacyBudget ledger records {recorded} "
                "private steps: the other steps were not accounted (trained without a DP strategy or without "
                "PrivacyBudget), so no epsilon can be claimed for this model. Resume only checkpoints written under "
                "PrivacyBudget, or start from weights that never saw the private data."
            )
        if state is None or is_legacy(state):
            return True  # a legacy state is judged by check_state
        verify_fields(state)  # the more precise finding first: which field was edited
        if binding_verifies(state, int(checkpoint.get("global_step", 0)), checkpoint.get("state_dict", {})):
            return True
        return self._accept_unverified(
            "is not the one written with this checkpoint ('binding': the ledger, the checkpoint's step and its "
            "weights do not match; a ledger copied from another run's checkpoint, or weights or step changed "
            "after saving)"
        )

    def check_state(self, state: Mapping[str, Any]) -> bool:
        """Verify a state's digests; returns whether it verified (``False``: accepted unverified)."""
        if "history" not in state:
            raise ValueError("This PrivacyBudget state has no 'history': it was not written by PrivacyBudget.")
        if is_legacy(state) and not os.environ.get(KEY_VARIABLE):
            return self._accept_unverified(
                "was written before ledgers carried digests (lightning-dp 0.1), or had its digests removed"
            )
        verify_fields(state)
        return state.get("ledger_verified") is not False  # an unverified ledger stays unverified

    def _accept_unverified(self, why: str) -> bool:
        if not self.allow_unverified:
            raise ValueError(
                f"The checkpoint's PrivacyBudget ledger {why}, so its integrity cannot be verified: an edited ledger "
                "would report less than the run spent. To resume it anyway, pass "
                "PrivacyBudget(allow_unverified_ledger=True); the run's report then says that its ledger is "
                "unverified."
            )
        rank_zero_warn(
            f"PrivacyBudget: the checkpoint's ledger {why}; resumed as it is (allow_unverified_ledger=True). The "
            "privacy report marks the ledger unverified."
        )
        return False


def stricter_targets(
    epsilon: Optional[float],
    delta: float,
    accountant: str,
    targets: list[Any],
    state: Mapping[str, Any],
) -> tuple[Optional[float], list[Any]]:
    """The budget a resume enforces: this callback's, with the checkpoint's risk targets where
    they are stricter (a resume must not loosen what the run promised). Warns where they differ."""
    if epsilon is None and state.get("epsilon") is not None:
        epsilon = float(state["epsilon"])
    elif epsilon is not None and state.get("epsilon") is not None and epsilon > state["epsilon"]:
        # Allowed (the ledger keeps every step spent, so the epsilon reported stays true), but
        # the run's guarantee becomes the larger figure: say so.
        rank_zero_warn(
            f"PrivacyBudget: resuming a run budgeted at epsilon={state['epsilon']:g} with epsilon={epsilon:g}: the "
            f"budget is raised, and the run's guarantee is the larger epsilon. Pass epsilon={state['epsilon']:g} to "
            "keep the original budget."
        )
    for name, mine in (("delta", delta), ("accountant", accountant)):
        if state.get(name) is not None and state[name] != mine:
            rank_zero_warn(
                f"PrivacyBudget: the checkpoint's run was accounted with {name}={state[name]!r}, this callback uses "
                f"{name}={mine!r}; the whole ledger is now reported with the latter."
            )
    advantage = [t.limit for t in targets if isinstance(t, AdvantageTarget)]
    if state.get("max_advantage") is not None:
        advantage.append(float(state["max_advantage"]))
    tprs = {t.fpr: t.limit for t in targets if isinstance(t, TprTarget)}
    for fpr, tpr in (state.get("max_tpr_at_fpr") or {}).items():
        tprs[float(fpr)] = min(float(tpr), tprs.get(float(fpr), math.inf))
    merged = risk_targets(min(advantage) if advantage else None, tprs or None)
    if merged != targets:
        rank_zero_warn(
            "PrivacyBudget: the checkpoint's risk targets are stricter than or not among this callback's; enforcing "
            f"{', '.join(f'{t.name}<={t.limit:g}' for t in merged)}."
        )
    return epsilon, merged


__all__ += ["bind_to_checkpoint", "stricter_targets", "verify_fields"]
