"""How a :class:`~lightning_dp.PrivacyBudget` spends from a dataset's
:class:`~lightning_dp.PrivacyLedger` under Lightning: one ledger record per fit attempt.

A training run (its ``run_id``, kept in its checkpoints: the *lineage*) may be fitted several
times: resumed after a crash, or branched from an older checkpoint into several continuations.
Each fit is one **attempt** with its own record in the ledger, charged for the steps that attempt
took (its history minus the history it started from; Renyi DP adds up, so the difference is
exact), plus whatever of the starting history the ledger never charged to that lineage (a
checkpoint trained under another ledger, or before one was attached). So a crashed attempt's
reservation keeps counting the steps it took after its last checkpoint, a resume is charged only
for its own steps, and four branches from one checkpoint are charged for four sets of steps.

Only rank zero talks to the ledger; every decision is broadcast, errors included, so that no
rank waits forever on another.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.ledger import LedgerRefused, LedgerTarget, PrivacyLedger

__all__ = ["LedgerSession"]


class LedgerSession:
    """The ledger side of one :class:`~lightning_dp.PrivacyBudget`."""

    def __init__(self, ledger: PrivacyLedger, name: Optional[str]) -> None:
        self.ledger = ledger
        self.name = name or ""
        self.attempt: Optional[str] = None  # this fit's record in the ledger
        self._base = PrivacyHistory()
        self._uncharged = np.zeros(len(ledger.rule.orders))

    def new_fit(self) -> None:
        """A fit starts: its first plan opens a new attempt."""
        self.attempt = None

    def _on_rank_zero(self, trainer: pl.Trainer, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank zero and hand its result, or its error, to every rank."""
        result: Any = None
        error: Optional[tuple[str, str]] = None
        if trainer.is_global_zero:
            try:
                result = action()
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = (type(err).__name__, str(err))
        result, error = trainer.strategy.broadcast((result, error))
        if error is not None:
            kind, message = error
            raise (LedgerRefused if kind == "LedgerRefused" else RuntimeError)(
                message if kind == "LedgerRefused" else f"The privacy ledger failed ({kind}): {message}"
            )
        return result

    def target(self, trainer: pl.Trainer) -> LedgerTarget:
        """What the ledger holds beside this attempt, as a planning target (same on every rank)."""
        exclude = self.attempt or ""
        others = self._on_rank_zero(trainer, lambda: self.ledger.planning_target(exclude).others.tolist())
        return LedgerTarget(self.ledger.rule, others)

    def _executed(self, history: PrivacyHistory) -> np.ndarray:
        spent = self.ledger.curve_of(history) - self.ledger.curve_of(self._base) + self._uncharged
        return np.maximum(spent, 0.0)

    def reserve(self, trainer: pl.Trainer, lineage: str, history: PrivacyHistory, planned: PrivacyHistory,
                kind: str = "training") -> None:
        """Before the first step of a plan: open this fit's attempt (at its first plan) and
        reserve what the plan would spend; refused on every rank when it does not fit."""

        def reserve() -> str:
            if self.attempt is None:
                self._base = history.copy()
                charged = self.ledger.lineage_committed(lineage)
                self._uncharged = np.maximum(self.ledger.curve_of(self._base) - charged, 0.0)
                if history.steps and np.any(self._uncharged > 1e-12):
                    rank_zero_warn(
                        f"PrivacyBudget: the {history.steps} private steps this run resumes from were not (all) charged "
                        f"to the ledger of dataset {self.ledger.dataset!r} (trained before the ledger was attached, or "
                        "under another one): this fit's reservation charges them now."
                    )
            return self.ledger.reserve(self._executed(planned), name=self.name, kind=kind,
                                       run_id=self.attempt or uuid.uuid4().hex, lineage=lineage)

        self.attempt = self._on_rank_zero(trainer, reserve)

    def commit(self, trainer: Optional[pl.Trainer], history: PrivacyHistory, epsilon: float, release: bool) -> None:
        """Commit what this attempt executed; with ``release``, end it. A commit the ledger marks
        as an overdraft (the run outgrew what it was admitted for) stops the Trainer."""
        if self.attempt is None or (trainer is not None and not trainer.is_global_zero):
            return
        try:
            self.ledger.commit(self.attempt, self._executed(history), epsilon=epsilon, steps=history.steps)
        except LedgerRefused as err:
            rank_zero_warn(f"PrivacyBudget: {err}")
            if trainer is not None:
                trainer.should_stop = True
        finally:
            if release:
                self.ledger.release(self.attempt)

    def summary(self) -> dict[str, Any]:
        return {**self.ledger.summary(), "attempt": self.attempt}
