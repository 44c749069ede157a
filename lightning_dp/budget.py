"""``PrivacyBudget``: how much privacy a run may spend, and making sure it spends no more."""

from __future__ import annotations

import inspect
import math
import os
import uuid
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_dp.accounting import (
    ACCOUNTANTS,
    AccountantName,
    PrivacyHistory,
    calibrate_noise,
    compute_epsilon,
    max_steps,
)
from lightning_dp.audit import PrivacyAudit
from lightning_dp.integrity import KEY_VARIABLE, bind, binding_verifies, seal, unverified_fields
from lightning_dp.risk import AdvantageTarget, PrivacyRisk, TprTarget, privacy_profile, risk_targets
from lightning_dp.spend_table import SpendTable
from lightning_dp.strategy import DPStrategy, _PrivateTraining

if TYPE_CHECKING:
    from lightning_dp.ddp import DPDDPStrategy

__all__ = ["PrivacyBudget", "PrivacyBudgetExhausted"]

#: Version 2 added the run's identity and the per-field digests.
_STATE_VERSION = 2
_SEALED_FIELDS = ("history", "epsilon", "delta", "accountant", "max_advantage", "max_tpr_at_fpr", "kappa",
                  "noise_multiplier", "safety_checks", "ledger_verified")


def _verify_fields(state: Mapping[str, Any]) -> None:
    bad = unverified_fields(state, required=_SEALED_FIELDS)
    if bad:
        raise ValueError(
            f"The checkpoint's PrivacyBudget ledger does not verify: field(s) {', '.join(map(repr, bad))} do not "
            "match the digest written with them (edited after the run saved them, or signed with another "
            f"{KEY_VARIABLE}). Resuming would report a spend that is not the one the run made, so it is refused. "
            "Resume from an unmodified checkpoint."
        )


def _is_legacy(state: Mapping[str, Any]) -> bool:
    """A state in lightning-dp 0.1's format (no version, no digests)."""
    return "digests" not in state and "version" not in state


class PrivacyBudgetExhausted(RuntimeError):
    """A private step was about to run although the budget allows none."""


class PrivacyBudget(Callback):
    r"""Calibrate, track and enforce an (epsilon, delta) privacy budget for DP training.

    With :class:`~lightning_dp.DPStrategy`, this callback

    * **calibrates** the noise: when the strategy's ``noise_multiplier`` is ``None``, it picks
      the smallest noise whose epsilon after the planned steps (``max_epochs``/``max_steps``
      and the loader's length) stays within ``epsilon``;
    * **stops** the Trainer *before* any step that would take epsilon above ``epsilon``
      (overriding ``min_epochs``/``min_steps`` with a warning);
    * **logs** ``dp/epsilon`` (also on the progress bar), ``dp/noise_multiplier``,
      ``dp/sample_rate``, ``dp/steps`` and ``dp/delta`` on every logging step, with the
      attack-risk bounds of :mod:`lightning_dp.risk`: ``dp/risk/advantage``,
      ``dp/risk/tpr_at_fpr_0.001``, ``dp/risk/tpr_at_fpr_0.01`` (and those of the TPR
      targets), and ``dp/risk/reconstruction`` given ``kappa``. The logged figures come from
      a table computed once per plan (:class:`~lightning_dp.spend_table.SpendTable`): upper
      bounds, exact at a few steps, at no accountant cost per step;
    * **checkpoints** the ledger of every step taken, so ``fit(ckpt_path=...)`` continues
      the spend exactly (a resume with another sample rate or noise adds a segment);
    * **reports** at the end of ``fit`` (and on demand, :meth:`report`): writes
      ``privacy_report.json`` and ``privacy_report.png`` into the logger's directory
      (``default_root_dir`` without a logger) and prints a table on rank zero: epsilon, the
      ledger, the membership-inference risk, a :class:`~lightning_dp.PrivacyAudit`'s result
      when one is attached, and whether the safety checks held.

    The budget is any of ``epsilon``, ``max_advantage`` and ``max_tpr_at_fpr`` (at least
    one; all that are given must hold): the risk targets bound what a membership-inference
    attacker can achieve, computed from the run's whole privacy profile (see
    :mod:`lightning_dp.risk`), and are calibrated to and enforced like epsilon.

    Args:
        epsilon: the budget's epsilon (> 0), or ``None`` for a budget of risk targets only.
        delta: the delta at which epsilon is reported and bounded, in (0, 1); should be well
            below 1/N for N examples.
        accountant: ``"prv"`` (default; tight numerical bound), ``"rdp"`` (looser, fast) or
            ``"gdp"`` (central-limit approximation: an estimate, not a bound).
        report: write and print the privacy report at the end of ``fit`` (default ``True``).
        max_advantage: bound on a membership-inference attacker's ``TPR - FPR``, in (0, 1).
        max_tpr_at_fpr: ``{false-positive rate: max true-positive rate}``, e.g.
            ``{0.01: 0.05}``: no attack flagging 1% of non-members may find more than 5% of
            members. Each rate in (0, 1), each TPR above its rate and below 1.
        kappa: log ``dp/risk/reconstruction``, the bound on reconstructing a record that a
            baseline guesses with probability ``kappa`` in (0, 1).
        log_risk: log the ``dp/risk/*`` figures (default ``True``); ``False`` skips their part
            of the plan's table (a few PLD compositions). Risk targets are enforced either way.
        allow_unverified_ledger: resume a checkpoint whose ledger cannot be verified (written by
            lightning-dp 0.1, before ledgers carried digests; or whose weights or step changed
            after saving) with a warning, instead of refusing it; the report then marks the
            ledger unverified. See :mod:`lightning_dp.integrity`.

    Attributes:
        epsilon_spent: epsilon at ``delta`` after the steps taken so far.
        risk: the attack-risk bounds (:class:`~lightning_dp.risk.PrivacyRisk`) so far.
        steps: the number of private steps taken so far.
        noise_multiplier: the noise multiplier in force (``None`` before calibration).

    Example::

        >>> import lightning as L
        >>> from lightning_dp import DPStrategy, PrivacyBudget
        >>> budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
        >>> trainer = L.Trainer(max_epochs=10, strategy=DPStrategy(max_grad_norm=1.0), callbacks=[budget],
        ...                     logger=False)
        >>> budget.steps, budget.epsilon_spent  # after trainer.fit(model, datamodule=dm): what was spent
        (0, 0.0)
        >>> risk_budget = PrivacyBudget(delta=1e-5, max_advantage=0.1, max_tpr_at_fpr={0.01: 0.05})
        >>> risk_budget.risk.advantage, risk_budget.risk.tpr_at_fpr[0.01]  # nothing spent yet
        (0.0, 0.01)
    """

    def __init__(
        self,
        epsilon: Optional[float] = None,
        delta: Optional[float] = None,
        accountant: AccountantName = "prv",
        report: bool = True,
        *,
        log_risk: bool = True,
        allow_unverified_ledger: bool = False,
        max_advantage: Optional[float] = None,
        max_tpr_at_fpr: Optional[Mapping[float, float]] = None,
        kappa: Optional[float] = None,
    ) -> None:
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self._risk_targets = risk_targets(max_advantage, max_tpr_at_fpr)
        if epsilon is None and not self._risk_targets:
            raise ValueError(
                "PrivacyBudget needs a budget: epsilon=..., max_advantage=... or max_tpr_at_fpr={fpr: tpr} "
                "(any combination; all given must hold)."
            )
        if delta is None:
            raise ValueError("PrivacyBudget needs delta=..., the delta at which epsilon is reported (e.g. 1e-5).")
        if kappa is not None and not (isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and 0 < kappa < 1):
            raise ValueError(f"kappa (the reconstruction baseline) must be a number in (0, 1), got {kappa!r}")
        self.kappa = None if kappa is None else float(kappa)
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if not isinstance(report, bool):
            raise ValueError(f"report must be True or False, got {report!r}")
        self.report_at_fit_end = report
        if not isinstance(log_risk, bool):
            raise ValueError(f"log_risk must be True or False, got {log_risk!r}")
        self.log_risk = log_risk
        if not isinstance(allow_unverified_ledger, bool):
            raise ValueError(f"allow_unverified_ledger must be True or False, got {allow_unverified_ledger!r}")
        self.allow_unverified_ledger = allow_unverified_ledger
        self.epsilon = None if epsilon is None else float(epsilon)
        self.delta = float(delta)
        self.accountant: AccountantName = accountant
        self._ledger = PrivacyHistory()
        self._strategy: Optional[DPStrategy | DPDDPStrategy] = None
        self._allowed_steps: Optional[int] = None
        self._planned_for: Optional[tuple[float, float]] = None  # (noise_multiplier, sample_rate)
        self._planned_end: float = math.inf  # the ledger's step count when the planned run ends
        self._plan_base = PrivacyHistory()  # the ledger when the plan was made
        self._table: Optional[SpendTable] = None
        self.stopped_reason: Optional[str] = None
        #: This run's identity, kept across resumes (part of every digest of its saved ledger).
        self.run_id = uuid.uuid4().hex
        #: ``False`` once a ledger that could not be verified was resumed (allow_unverified_ledger).
        self.ledger_verified = True
        #: The ledger's step count at each resume, and ``(step, epsilon budget)`` at each change of
        #: the budget (for the report's figure).
        self.resumed_at: list[int] = []
        self.budget_changes: list[tuple[int, Optional[float]]] = []

    # ------------------------------------------------------------------ what was spent
    @property
    def history(self) -> PrivacyHistory:
        """The ledger of private steps (shared with the strategy during ``fit``)."""
        return self._ledger

    @property
    def steps(self) -> int:
        return self._ledger.steps

    @property
    def epsilon_spent(self) -> float:
        return compute_epsilon(self._ledger, self.delta, self.accountant)

    @property
    def max_advantage(self) -> Optional[float]:
        """The advantage target enforced, or ``None``."""
        found = [t.limit for t in self._risk_targets if isinstance(t, AdvantageTarget)]
        return found[0] if found else None

    @property
    def max_tpr_at_fpr(self) -> dict[float, float]:
        """The TPR targets enforced, ``{false-positive rate: max TPR}`` (empty if none)."""
        return {t.fpr: t.limit for t in self._risk_targets if isinstance(t, TprTarget)}

    @property
    def risk(self) -> PrivacyRisk:
        """Bounds on membership inference (at FPR 0.1%, 1% and the targets' rates) and, with
        ``kappa``, reconstruction, for the steps taken so far."""
        fprs = sorted({0.001, 0.01, *self.max_tpr_at_fpr})
        return privacy_profile(self._ledger).risk(fprs, self.kappa)

    def _budget_text(self) -> str:
        parts = [] if self.epsilon is None else [f"epsilon={self.epsilon:g}"]
        parts += [f"{t.name}<={t.limit:g}" for t in self._risk_targets]
        return ", ".join(parts)

    @property
    def noise_multiplier(self) -> Optional[float]:
        return self._strategy.noise_multiplier if self._strategy is not None else None

    @property
    def allowed_steps(self) -> Optional[int]:
        """Total private steps the budget allows at the noise and sample rate in force."""
        return self._allowed_steps

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, _PrivateTraining):
            raise ValueError(
                f"PrivacyBudget needs Trainer(strategy=DPStrategy(...)) or DPDDPStrategy (strategy='dp' or "
                f"'dp_ddp'), but the Trainer "
                f"uses {type(strategy).__name__}: the run would not be private and epsilon would be meaningless."
            )
        if strategy.history is not self._ledger:
            # This callback's ledger is the budget's memory: a strategy that already took steps
            # elsewhere adds them, it never replaces them.
            self._absorb(strategy.history, source="the strategy's earlier steps")
            strategy.history = self._ledger
        strategy.budget = self
        self._strategy = strategy
        self._allowed_steps = None
        # The run as the user configured it: tuners shorten max_steps for their trial loops,
        # and the noise they train with is calibrated for this run, not for their trials.
        self._configured_max_steps = trainer.max_steps

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._strategy is not None:
            self._strategy.budget = None

    # ------------------------------------------------------------------ planning
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan(trainer)

    def ensure_planned(self, trainer: pl.Trainer) -> None:
        """Plan unless this fit already did. Called by the strategy when training starts, so
        that loops run without this callback's hooks (the tuners swap the Trainer's callbacks
        out) are planned too."""
        if self._allowed_steps is None:
            self.plan(trainer)

    def plan(self, trainer: pl.Trainer, sample_rate: Optional[float] = None) -> None:
        """Calibrate the noise if asked, and work out how many steps the budget allows at the
        noise in force and ``sample_rate`` (default: the training loader's)."""
        strategy = self._strategy
        assert strategy is not None
        self.stopped_reason = None
        loader = strategy.train_dataloader
        if loader is None:
            return
        q = strategy.sample_rate if sample_rate is None else float(sample_rate)
        n = len(loader.dataset)  # type: ignore[arg-type]
        if self.delta >= 1 / n:
            rank_zero_warn(
                f"PrivacyBudget(delta={self.delta:g}) is not below 1/N = {1 / n:.3g} for N={n} training examples: "
                "a mechanism that publishes one whole example would meet it. Use delta << 1/N."
            )
        _, remaining = _private_steps_progress(trainer, self._tuner_max_steps(trainer))
        if strategy.requested_noise_multiplier is None:
            if not math.isfinite(remaining):
                raise ValueError(
                    "PrivacyBudget calibrates the noise over the planned run, but the Trainer has no end "
                    "(max_epochs=-1 and max_steps=-1). Set max_epochs or max_steps, or give "
                    "DPStrategy(noise_multiplier=...)."
                )
            try:
                strategy.noise_multiplier = calibrate_noise(
                    self._ledger, q, max(int(remaining), 1), self.epsilon, self.delta, self.accountant,
                    targets=self._risk_targets,
                )
            except ValueError:  # the ledger alone spends the budget: no step is allowed
                strategy.noise_multiplier = strategy.noise_multiplier or math.inf
        # Every process computes the same plan; rank 0's is broadcast so they cannot diverge.
        sigma = strategy.noise_multiplier = trainer.strategy.broadcast(strategy.noise_multiplier)
        assert sigma is not None
        limit = int(remaining) if math.isfinite(remaining) else None
        extra = 0 if math.isinf(sigma) else max_steps(
            self._ledger, sigma, q, self.epsilon, self.delta, self.accountant, limit=limit, targets=self._risk_targets
        )
        extra = trainer.strategy.broadcast(extra)
        self._allowed_steps = self._ledger.steps + extra
        self._planned_for = (sigma, q)
        self._planned_end = self._ledger.steps + remaining
        if not self.budget_changes or self.budget_changes[-1][1] != self.epsilon:
            self.budget_changes.append((self._ledger.steps, self.epsilon))
        self._plan_base = PrivacyHistory(list(self._ledger.segments))
        self._table = None  # built when first logged
        rank_zero_info(
            f"PrivacyBudget: {self._budget_text()}, delta={self.delta:g} ({self.accountant}); noise multiplier "
            f"{sigma:.4g}, sample rate {q:.4g}; {self._ledger.steps} steps spent, the budget allows "
            f"{extra} more of the {remaining:g} planned."
        )
        if extra == 0:
            self._stop(trainer)

    # ------------------------------------------------------------------ enforcing
    def _tuner_max_steps(self, trainer: pl.Trainer) -> Optional[int]:
        """The configured max_steps when a tuner runs its trial loops (this callback is then not
        among the Trainer's callbacks and max_steps is the tuner's), else ``None``."""
        if any(c is self for c in trainer.callbacks):  # type: ignore[attr-defined]
            return None
        return getattr(self, "_configured_max_steps", None)

    def ensure_step_allowed(self, trainer: pl.Trainer, sample_rate: Optional[float] = None) -> None:
        """Raise unless one more private step at ``sample_rate`` (the rate the batch about to
        train was drawn with; default the training loader's) fits the budget. Called by the
        strategy before it touches a batch: a last line of defence behind the clean stop."""
        strategy = self._strategy
        assert strategy is not None
        q = strategy.sample_rate if sample_rate is None else float(sample_rate)
        if self._allowed_steps is None or self._planned_for != (strategy.noise_multiplier, q):
            # Loops that run without this callback's hooks (the tuners swap the callbacks out)
            # still take private steps; a noise changed mid-run, or a batch drawn at another rate
            # than the plan's (a reloaded loader), changes what the budget allows: plan again, at
            # the rate that actually trains.
            self.plan(trainer, q)
            assert self._allowed_steps is not None
        if self._ledger.steps >= self._allowed_steps:
            if self._tuner_max_steps(trainer) is not None:
                raise PrivacyBudgetExhausted(
                    f"The privacy budget ({self._budget_text()}, delta={self.delta:g}) allows {self._allowed_steps} "
                    f"steps at noise multiplier {strategy.noise_multiplier:g} and sample rate {q:g}, all taken, and a "
                    "tuner (lr_find or scale_batch_size) asked for another: its trial steps are private steps on the "
                    "ledger. Give the tuner fewer steps (num_training, steps_per_trial, max_trials), or the run a "
                    "larger budget or more noise."
                )
            raise PrivacyBudgetExhausted(
                f"The privacy budget ({self._budget_text()}, delta={self.delta:g}) allows {self._allowed_steps} "
                f"steps at noise multiplier {strategy.noise_multiplier:g}, all taken, yet the Trainer asked for "
                "another: something undid PrivacyBudget's stop or lowered the noise after it planned."
            )

    def after_step(self, trainer: pl.Trainer) -> None:
        """Stop the Trainer once the budget allows no further step. Called by the strategy right
        after it records a private step (so loops without this callback's hooks, the tuners',
        stop too), and again at the end of each batch (after other callbacks ran)."""
        strategy = self._strategy
        if self._allowed_steps is None or strategy is None or self._planned_for is None:
            return
        if self._planned_for[0] != strategy.noise_multiplier:
            self.plan(trainer, self._planned_for[1])  # the noise changed: what the budget allows changed with it
        if self._ledger.steps >= self._allowed_steps and not trainer.should_stop:
            self._stop(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after_step(trainer)
        if trainer._logger_connector.should_update_logs:
            self._log(pl_module)

    def _spend_table(self) -> SpendTable:
        """The plan's table of epsilon and risk by step, built on first use after each plan: the
        logged figures come from it, never from an accountant query per step."""
        if self._table is None:
            assert self._planned_for is not None
            sigma, q = self._planned_for
            base = self._plan_base
            steps = 0 if math.isinf(sigma) else max(int(min(self._allowed_steps or 0, self._planned_end)) - base.steps, 0)
            self._table = SpendTable.build(
                base, sigma, q, steps, self.delta, self.accountant, sorted({0.001, 0.01, *self.max_tpr_at_fpr}),
                self.kappa, risk=self.log_risk,
            )
        return self._table

    def _log(self, pl_module: pl.LightningModule) -> None:
        strategy = self._strategy
        assert strategy is not None and strategy.noise_multiplier is not None and self._planned_for is not None
        table, k = self._spend_table(), self._ledger.steps - self._plan_base.steps
        # The plan's last step is logged with the accountant's own figure (the stop computed it),
        # so the curve ends on what the report says.
        metrics = {
            "dp/epsilon": table.epsilon(k) if k < table.steps else self.epsilon_spent,
            "dp/noise_multiplier": strategy.noise_multiplier,
            "dp/sample_rate": self._planned_for[1],
            "dp/steps": float(self._ledger.steps),
            "dp/delta": self.delta,
        }
        risk = table.risk(k) if self.log_risk else None
        if risk is not None:
            metrics["dp/risk/advantage"] = risk.advantage
            for fpr, tpr in risk.tpr_at_fpr.items():
                metrics[f"dp/risk/tpr_at_fpr_{fpr:g}"] = tpr
            if risk.reconstruction is not None:
                metrics["dp/risk/reconstruction"] = risk.reconstruction
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "dp/epsilon", batch_size=1)

    def _stop(self, trainer: pl.Trainer) -> None:
        strategy = self._strategy
        assert strategy is not None and self._planned_for is not None
        sigma, q = strategy.noise_multiplier, self._planned_for[1]
        if sigma is not None and math.isfinite(sigma):
            nxt = compute_epsilon(self._ledger.extended(sigma, q, 1), self.delta, self.accountant)
            after = f"one more step would spend {nxt:.4g}"
        else:
            after = "no noise level allows another step"
        if self._ledger.steps >= self._planned_end:
            # The Trainer's own plan ends here too: say so rather than claim the budget stopped it.
            self.stopped_reason = (
                f"PrivacyBudget: the planned run ends ({_plan_text(trainer)}) after {self._ledger.steps} private steps, "
                f"which is also the most the budget allows: {self._spent_text()}; {after}."
            )
        else:
            self.stopped_reason = (
                f"PrivacyBudget: stopping after {self._ledger.steps} private steps, the most the budget allows, "
                f"before the planned run's end ({_plan_text(trainer)}): {self._spent_text()}; {after}."
            )
        if self._tuner_max_steps(trainer) is not None:
            rank_zero_warn(
                self.stopped_reason + " This happened in a tuner's trial run (lr_find or scale_batch_size): its trial "
                "steps are private steps on the ledger, and its result rests on the steps it could take."
            )
        else:
            rank_zero_info(self.stopped_reason)
        trainer.should_stop = True
        fit_loop = trainer.fit_loop
        if fit_loop.min_epochs or fit_loop.epoch_loop.min_steps:
            rank_zero_warn(
                f"PrivacyBudget overrides min_epochs={fit_loop.min_epochs} / min_steps={fit_loop.epoch_loop.min_steps}: "
                "the budget is spent, so training stops before them."
            )
            fit_loop.min_epochs = 0
            fit_loop.epoch_loop.min_steps = 0

    def _spent_text(self) -> str:
        spent = self.epsilon_spent
        if self.epsilon is not None:
            text = f"epsilon={spent:.4g} of {self.epsilon:g} (delta={self.delta:g}, {self.accountant})"
        else:
            text = f"epsilon={spent:.4g} (delta={self.delta:g}, {self.accountant}, no epsilon target)"
        for target in self._risk_targets:
            text += f", {target.name}={target.value(self._ledger):.4g} of {target.limit:g}"
        return text

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped_reason is not None or self._allowed_steps is None:
            return  # the budget ended the run, and said so
        more = self._allowed_steps - self._ledger.steps
        if self._ledger.steps >= self._planned_end:
            why = f"the planned run ended ({_plan_text(trainer)})"
        else:
            why = "training stopped before the planned run's end, and not because of the budget (another callback, " \
                  "or the user)"
        self.stopped_reason = (
            f"PrivacyBudget: {why} after {self._ledger.steps} private steps; the budget would allow {more} more: "
            f"{self._spent_text()}."
        )
        rank_zero_info(self.stopped_reason)

    # ------------------------------------------------------------------ the report
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.report_at_fit_end:
            return
        audit = _audit_of(trainer)
        if audit is not None:
            audit.run(trainer, pl_module)  # whichever callback's on_fit_end comes first
        self.report(trainer)

    def report(
        self, trainer: Optional[pl.Trainer] = None, directory: Optional[Union[str, Path]] = None, show: bool = True
    ) -> dict[str, Any]:
        """Build the privacy report, write ``privacy_report.json`` and ``privacy_report.png``
        and print its table (rank zero only); return the report's dict.

        Args:
            trainer: the Trainer this callback is attached to: where the files go (the log
                directory of every logger, where the run's other artefacts go; without a logger,
                ``default_root_dir``), the strategy's safety checks, and a
                :class:`~lightning_dp.PrivacyAudit`'s result. Another run's report there is
                never overwritten (see :func:`~lightning_dp.report.write_report`).
            directory: write here instead of the Trainer's directory. With neither, nothing
                is written (the report is still returned and printed).
            show: print the table.
        """
        from lightning_dp.report import build_report, print_report, safety_checks, write_report

        audit = _audit_of(trainer) if trainer is not None else None
        checks = safety_checks(self._strategy) if self._strategy is not None else None
        built = build_report(self, audit.result if audit is not None else None, checks)
        directories = [Path(directory)] if directory is not None else _artefact_dirs(trainer)
        if trainer is None or trainer.is_global_zero:
            for where in directories:
                json_path, png_path = write_report(built, where, self._ledger)
                rank_zero_info(f"PrivacyBudget: privacy report written to {json_path} and {png_path.name}.")
            if show:
                print_report(built)
        return built

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        from lightning_dp.report import safety_checks

        fields = {
            "history": self._ledger.state_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "max_advantage": self.max_advantage,
            "max_tpr_at_fpr": self.max_tpr_at_fpr,
            "kappa": self.kappa,
            "noise_multiplier": self.noise_multiplier,
            # For `python -m lightning_dp report CHECKPOINT`: the facts behind the guarantee.
            "safety_checks": safety_checks(self._strategy) if self._strategy is not None else None,
            "ledger_verified": self.ledger_verified,
            "marks": {"resumed_at": list(self.resumed_at), "budget_changes": [list(c) for c in self.budget_changes]},
        }
        # Each field with a digest of its value and the run's identity: an edited ledger is
        # refused on resume (lightning_dp.integrity).
        return {"version": _STATE_VERSION, **fields, **seal(fields, self.run_id)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise ValueError("This PrivacyBudget state has no 'history': it was not written by PrivacyBudget.")
        if _is_legacy(state_dict) and not os.environ.get(KEY_VARIABLE):
            self._accept_unverified(
                "was written before ledgers carried digests (lightning-dp 0.1), or had its digests removed"
            )
        else:
            _verify_fields(state_dict)
            self.run_id = str(state_dict["run_id"])
            if state_dict.get("ledger_verified") is False:
                self.ledger_verified = False  # an unverified ledger stays unverified across resumes
        loaded = PrivacyHistory()
        loaded.load_state_dict(state_dict["history"])
        self._absorb(loaded, source="the checkpoint")
        marks = state_dict.get("marks") or {}
        self.resumed_at = [int(s) for s in marks.get("resumed_at", [])] + [loaded.steps]
        self.budget_changes = [(int(s), None if e is None else float(e)) for s, e in marks.get("budget_changes", [])]
        self._adopt_targets(state_dict)

    def _accept_unverified(self, why: str) -> None:
        if not self.allow_unverified_ledger:
            raise ValueError(
                f"The checkpoint's PrivacyBudget ledger {why}, so its integrity cannot be verified: an edited "
                "ledger would report less than the run spent. To resume it anyway, pass "
                "PrivacyBudget(allow_unverified_ledger=True); the run's report then says that its ledger is "
                "unverified."
            )
        rank_zero_warn(
            f"PrivacyBudget: the checkpoint's ledger {why}; resumed as it is (allow_unverified_ledger=True). The "
            "privacy report marks the ledger unverified."
        )
        self.ledger_verified = False

    def _adopt_targets(self, state: dict[str, Any]) -> None:
        """Enforce the checkpoint's risk targets too (the stricter of each pair): a resume
        must not loosen what the run promised."""
        if self.epsilon is None and state.get("epsilon") is not None:
            self.epsilon = float(state["epsilon"])
        elif self.epsilon is not None and state.get("epsilon") is not None and self.epsilon > state["epsilon"]:
            # Allowed (the ledger keeps every step spent, so the epsilon reported stays true), but
            # the run's guarantee becomes the larger figure: say so.
            rank_zero_warn(
                f"PrivacyBudget: resuming a run budgeted at epsilon={state['epsilon']:g} with epsilon={self.epsilon:g}: "
                f"the budget is raised, and the run's guarantee is the larger epsilon. Pass "
                f"epsilon={state['epsilon']:g} to keep the original budget."
            )
        for name in ("delta", "accountant"):
            if state.get(name) is not None and state[name] != getattr(self, name):
                rank_zero_warn(
                    f"PrivacyBudget: the checkpoint's run was accounted with {name}={state[name]!r}, this callback "
                    f"uses {name}={getattr(self, name)!r}; the whole ledger is now reported with the latter."
                )
        advantage = [a for a in (self.max_advantage, state.get("max_advantage")) if a is not None]
        tprs = dict(self.max_tpr_at_fpr)
        for fpr, tpr in (state.get("max_tpr_at_fpr") or {}).items():
            tprs[float(fpr)] = min(float(tpr), tprs.get(float(fpr), math.inf))
        merged = risk_targets(min(advantage) if advantage else None, tprs or None)
        if merged != self._risk_targets:
            rank_zero_warn(
                f"PrivacyBudget: the checkpoint's risk targets are stricter than or not among this callback's; "
                f"enforcing {', '.join(f'{t.name}<={t.limit:g}' for t in merged)}."
            )
            self._risk_targets = merged
            self._allowed_steps = None  # plan again under them

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        global_step = int(checkpoint.get("global_step", 0))
        if not pl_module.automatic_optimization:
            # global_step counts every optimizer's steps (the generator's too); DPStrategy takes
            # one private step per batch, so the batches trained are what the ledger must cover.
            progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
            global_step = int(progress.get("total", {}).get("completed", global_step))
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        recorded = 0
        if state is not None:
            recorded = sum(int(s[2]) for s in state["history"]["segments"])
        if recorded < global_step:
            raise ValueError(
                f"The checkpoint was trained for {global_step} steps but its PrivacyBudget ledger records "
                f"{recorded} private steps: the other steps were not accounted (trained without DPStrategy or "
                "without PrivacyBudget), so no epsilon can be claimed for this model. Resume only checkpoints "
                "written under PrivacyBudget, or start from weights that never saw the private data."
            )
        self.verify_binding(checkpoint)

    def verify_binding(self, checkpoint: Mapping[str, Any]) -> None:
        """Refuse (or with ``allow_unverified_ledger``, accept marked unverified) a checkpoint whose
        ledger was not written with its weights and step (:func:`lightning_dp.integrity.bind`)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and not _is_legacy(state):
            _verify_fields(state)  # the more precise finding first: which field was edited
            if not binding_verifies(state, int(checkpoint.get("global_step", 0)), checkpoint.get("state_dict", {})):
                self._accept_unverified(
                    "is not the one written with this checkpoint ('binding': the ledger, the checkpoint's step and "
                    "its weights do not match; a ledger copied from another run's checkpoint, or weights or step "
                    "changed after saving)"
                )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and "digests" in state:
            # Tie the ledger to this checkpoint's step and weights (lightning_dp.integrity.bind).
            state["binding"] = bind(state, int(checkpoint.get("global_step", 0)), checkpoint.get("state_dict", {}))

    def _absorb(self, other: PrivacyHistory, source: str) -> None:
        """Merge another ledger into this one without ever forgetting a step."""
        ledger = self._ledger
        if other is ledger or other.steps == 0:
            return
        if ledger.steps == 0:
            ledger.segments = list(other.segments)
        elif other.is_prefix_of(ledger):
            rank_zero_info(
                f"PrivacyBudget: keeping the {ledger.steps - other.steps} private steps taken since {source} was "
                "written: privacy spent on the data cannot be unspent."
            )
        elif ledger.is_prefix_of(other):
            ledger.segments = list(other.segments)
        else:
            rank_zero_warn(
                f"PrivacyBudget: {source} records a different history ({other.steps} steps) than this callback "
                f"({ledger.steps} steps); counting both."
            )
            merged = PrivacyHistory(list(other.segments))
            for sigma, q, n in ledger.segments:
                merged.record(sigma, q, n)
            ledger.segments = merged.segments


def _audit_of(trainer: pl.Trainer) -> Optional[PrivacyAudit]:
    audits = [c for c in trainer.callbacks if isinstance(c, PrivacyAudit)]  # type: ignore[attr-defined]
    return audits[0] if audits else None


def _artefact_dirs(trainer: Optional[pl.Trainer]) -> list[Path]:
    """Where a run's report goes: each logger's log directory (several loggers: each gets it),
    else the Trainer's default_root_dir."""
    if trainer is None:
        return []
    found: list[Path] = []
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if where is not None and Path(where) not in found:
            found.append(Path(where))
    return found or [Path(trainer.default_root_dir)]


def _plan_text(trainer: pl.Trainer) -> str:
    parts = []
    if trainer.max_epochs not in (None, -1):
        parts.append(f"max_epochs={trainer.max_epochs}")
    if trainer.max_steps != -1:
        parts.append(f"max_steps={trainer.max_steps}")
    if trainer.limit_train_batches not in (None, 1.0):
        parts.append(f"limit_train_batches={trainer.limit_train_batches}")
    return ", ".join(parts) or "no end set"


def _private_steps_progress(trainer: pl.Trainer, max_steps: Optional[int] = None) -> tuple[float, float]:
    """(steps taken, steps still planned) in units of private steps.

    With automatic optimization these are optimizer steps. With manual optimization
    ``global_step`` counts every optimizer's steps (a GAN's generator too) while DPStrategy
    takes one private step per batch, so they are batches: the planned epochs' batches, capped
    by ``max_steps`` (each batch takes at least its private step, so at most that many remain).
    """
    if max_steps is None:
        max_steps = trainer.max_steps
    if trainer.lightning_module.automatic_optimization:
        planned: float = trainer.estimated_stepping_batches
        if max_steps != trainer.max_steps:
            per_epoch = math.ceil(trainer.num_training_batches)
            planned = math.inf if trainer.max_epochs in (None, -1) else per_epoch * max(trainer.max_epochs, 1)
            planned = min(planned, max_steps) if max_steps != -1 else planned
        return trainer.global_step, planned - trainer.global_step
    batches = trainer.fit_loop.epoch_loop.batch_progress
    per_epoch = trainer.num_training_batches
    left = math.inf
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch):
        left = (max(trainer.max_epochs, 1) - trainer.current_epoch) * per_epoch - batches.current.processed
    if max_steps != -1:
        left = min(left, max_steps - trainer.global_step)
    return batches.total.processed, max(left, 0)


def _declare_delta_required(init: Any) -> None:
    """Give ``PrivacyBudget.__init__`` the signature its callers must honour: ``delta`` is required.

    It has a default of ``None`` in the code only because it follows the optional ``epsilon``
    positionally (``PrivacyBudget(3.0, 1e-5)`` keeps working). Parsers that read signatures
    (LightningCLI's jsonargparse) then reject a configuration without ``delta`` when they parse
    it, with one line that names it, instead of failing deep inside instantiation."""
    signature = inspect.signature(init)
    params, keyword_only = [], False
    for p in signature.parameters.values():
        if p.name == "delta":
            keyword_only = True
            p = p.replace(default=inspect.Parameter.empty, annotation="float")
        if keyword_only and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            p = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        params.append(p)
    init.__signature__ = signature.replace(parameters=params)


_declare_delta_required(PrivacyBudget.__init__)
