"""``PrivacyBudget``: how much privacy a run may spend, and making sure it spends no more.

A thin adapter over the core :class:`~lightning_dp.core.budget.Budget`: it turns the Trainer's
plan into a calibration and a number of steps allowed, guards each private step of the strategy
it attaches to (:class:`~lightning_dp.lightning.interfaces.StepGuard`), logs the figures of the
plan's table, checkpoints the history (``budget_state.py``) and hands a plain record to the
privacy report.

Why one module of about 590 lines: it is one Lightning callback, and Lightning finds a
callback's hooks on its class. Each hook is a few lines over the core :class:`~lightning_dp.core.budget.Budget`
(planning, stopping) or a helper module (``budget_state.py``: resume rules and sealing;
``trainer_plan.py``: steps left in a Trainer's plan); about a quarter is the class docstring.
"""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_dp.core.accounting import ACCOUNTANTS, AccountantName, PrivacyTarget, compute_epsilon
from lightning_dp.core.budget import Budget, PrivacyBudgetExhausted
from lightning_dp.core.history import PrivacyHistory
from lightning_dp.core.risk import AdvantageTarget, PrivacyRisk, TprTarget, privacy_profile, risk_targets
from lightning_dp.core.spend_table import SpendTable
from lightning_dp.core.ledger import LedgerTarget, PrivacyLedger
from lightning_dp.lightning.budget_ledger import LedgerSession
from lightning_dp.lightning.budget_state import ResumeRules, bind_to_checkpoint, sealed, stricter_targets
from lightning_dp.lightning.interfaces import AuditView
from lightning_dp.lightning.routing import RoutesPrivateStep
from lightning_dp.lightning.trainer_plan import artefact_dirs, plan_text, private_steps_progress
from lightning_dp.report import PrivacyRecord, build_report, print_report, write_report

__all__ = ["PrivacyBudget", "PrivacyBudgetExhausted"]


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
      attack-risk bounds of :mod:`lightning_dp.core.risk`: ``dp/risk/advantage``,
      ``dp/risk/tpr_at_fpr_0.001``, ``dp/risk/tpr_at_fpr_0.01`` (and those of the TPR
      targets), and ``dp/risk/reconstruction`` given ``kappa``. The logged figures come from
      a table computed once per plan (:class:`~lightning_dp.core.spend_table.SpendTable`): upper
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
    :mod:`lightning_dp.core.risk`), and are calibrated to and enforced like epsilon.

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
            ledger unverified. See :mod:`lightning_dp.core.integrity`.
        ledger: the dataset's :class:`~lightning_dp.PrivacyLedger`, shared by every run on the
            dataset. Before the first step the planned run is reserved there (refused, data
            untouched, when it does not fit in what remains); what ran is committed at each
            checkpoint and at the end, and the rest released. With ``epsilon=None`` the run's
            noise (or its number of steps) is planned to fit what remains. ``delta`` defaults to
            the dataset's. Only rank zero talks to the ledger.
        run_name: the run's name in the ledger (e.g. its hyper-parameters).

    Attributes:
        epsilon_spent: epsilon at ``delta`` after the steps taken so far.
        risk: the attack-risk bounds (:class:`~lightning_dp.core.risk.PrivacyRisk`) so far.
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
        ledger: Optional[PrivacyLedger] = None,
        run_name: Optional[str] = None,
    ) -> None:
        if ledger is not None and not isinstance(ledger, PrivacyLedger):
            raise ValueError(f"ledger must be a lightning_dp.PrivacyLedger, got {type(ledger).__name__}")
        if ledger is not None and delta is None:
            delta = ledger.rule.delta
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        targets: list[PrivacyTarget] = list(risk_targets(max_advantage, max_tpr_at_fpr))
        if ledger is not None and epsilon is None:
            # No run budget of its own: the run may spend what remains of the dataset's (its plan is
            # made against what the ledger holds when the run starts; see _refresh_ledger_target).
            targets = [*targets, LedgerTarget(ledger.rule, [0.0] * len(ledger.rule.orders))]
        if epsilon is None and not targets:
            raise ValueError(
                "PrivacyBudget needs a budget: epsilon=..., max_advantage=... or max_tpr_at_fpr={fpr: tpr} "
                "(any combination; all given must hold)."
            )
        if delta is None:
            raise ValueError("PrivacyBudget needs delta=..., the delta at which epsilon is reported (e.g. 1e-5).")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if kappa is not None and not (isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and 0 < kappa < 1):
            raise ValueError(f"kappa (the reconstruction baseline) must be a number in (0, 1), got {kappa!r}")
        for name, value in (("report", report), ("log_risk", log_risk), ("allow_unverified_ledger", allow_unverified_ledger)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.report_at_fit_end = report
        self.log_risk = log_risk
        self.kappa = None if kappa is None else float(kappa)
        self.rules = ResumeRules(allow_unverified=allow_unverified_ledger)
        #: The accounting: targets over the history of every private step (shared with the strategy).
        self.budget = Budget(epsilon, float(delta), accountant, targets=targets)
        self._strategy: Optional[RoutesPrivateStep] = None
        self._allowed_steps: Optional[int] = None
        self._planned_for: Optional[tuple[float, float]] = None  # (noise_multiplier, sample_rate)
        self._planned_end: float = math.inf  # the history's step count when the planned run ends
        self._plan_base = PrivacyHistory()  # the history when the plan was made
        self._table: Optional[SpendTable] = None
        self._configured_max_steps: Optional[int] = None
        self.stopped_reason: Optional[str] = None
        #: This run's identity, kept across resumes (part of every digest of its saved ledger).
        self.run_id = uuid.uuid4().hex
        #: ``False`` once a ledger that could not be verified was resumed (allow_unverified_ledger).
        self.ledger_verified = True
        #: The checkpoint a DP strategy verified as read from the file (held only until this
        #: callback's own on_load_checkpoint).
        self._verified_checkpoint: Optional[Mapping[str, Any]] = None
        #: The history's step count at each resume, and ``(step, epsilon budget)`` at each change of
        #: the budget (for the report's figure).
        self.resumed_at: list[int] = []
        self.budget_changes: list[tuple[int, Optional[float]]] = []
        #: The dataset's ledger this run reserves in and commits to (rank zero only talks to it).
        self.ledger = ledger
        self.run_name = run_name
        self._ledger = None if ledger is None else LedgerSession(ledger, run_name)

    # ------------------------------------------------------------------ what was spent
    @property
    def epsilon(self) -> Optional[float]:
        return self.budget.epsilon

    @property
    def delta(self) -> float:
        return self.budget.delta

    @property
    def accountant(self) -> AccountantName:
        return self.budget.accountant

    @property
    def history(self) -> PrivacyHistory:
        """The ledger of private steps (shared with the strategy during ``fit``)."""
        return self.budget.history

    @property
    def allow_unverified_ledger(self) -> bool:
        return self.rules.allow_unverified

    @property
    def steps(self) -> int:
        return self.history.steps

    @property
    def epsilon_spent(self) -> float:
        return self.budget.spent

    @property
    def max_advantage(self) -> Optional[float]:
        """The advantage target enforced, or ``None``."""
        found = [t.limit for t in self.budget.targets if isinstance(t, AdvantageTarget)]
        return found[0] if found else None

    @property
    def max_tpr_at_fpr(self) -> dict[float, float]:
        """The TPR targets enforced, ``{false-positive rate: max TPR}`` (empty if none)."""
        return {t.fpr: t.limit for t in self.budget.targets if isinstance(t, TprTarget)}

    @property
    def risk(self) -> PrivacyRisk:
        """Bounds on membership inference (at FPR 0.1%, 1% and the targets' rates) and, with
        ``kappa``, reconstruction, for the steps taken so far."""
        return privacy_profile(self.history).risk(sorted({0.001, 0.01, *self.max_tpr_at_fpr}), self.kappa)

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
        if not isinstance(strategy, RoutesPrivateStep):
            raise ValueError(
                "PrivacyBudget needs Trainer(strategy=DPStrategy(...)) or DPDDPStrategy (strategy='dp' or 'dp_ddp'), "
                f"but the Trainer uses {type(strategy).__name__}: the run would not be private and epsilon would be "
                "meaningless."
            )
        if strategy.history is not self.history:
            # This callback's history is the budget's memory: a strategy that already took steps
            # elsewhere adds them, it never replaces them.
            self._absorb(strategy.history, source="the strategy's earlier steps")
            strategy.history = self.history
        strategy.budget = self
        self._strategy = strategy
        self._allowed_steps = None
        if self._ledger is not None:
            self._ledger.new_fit()
        # The run as the user configured it: tuners shorten max_steps for their trial loops,
        # and the noise they train with is calibrated for this run, not for their trials.
        self._configured_max_steps = trainer.max_steps

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # The run ends (finished, stopped or failed): commit what it executed, free the rest. A
            # process killed before this keeps its whole reservation counted.
            self._commit(trainer, release=True)
        if stage == "fit" and self._strategy is not None:
            self._strategy.budget = None

    # ------------------------------------------------------------------ planning
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan(trainer)

    def ensure_planned(self, trainer: pl.Trainer) -> None:
        """Plan unless this fit already did (the strategy calls this when training starts, so loops
        without this callback's hooks, the tuners', are planned too)."""
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
        n = int(getattr(loader, "unit_count", len(loader.dataset)))  # type: ignore[arg-type]
        unit = getattr(loader, "privacy_unit", "example")
        if self.delta >= 1 / n:
            rank_zero_warn(
                f"PrivacyBudget(delta={self.delta:g}) is not below 1/N = {1 / n:.3g} for N={n} training {unit}s: a "
                f"mechanism that publishes one whole {unit} would meet it. Use delta << 1/N."
            )
        _, remaining = private_steps_progress(trainer, self._tuner_max_steps(trainer))
        if self._ledger is not None and self.epsilon is None:
            self._refresh_ledger_target(trainer)
        if strategy.requested_noise_multiplier is None:
            if not math.isfinite(remaining):
                raise ValueError(
                    "PrivacyBudget calibrates the noise over the planned run, but the Trainer has no end (max_epochs=-1 "
                    f"and max_steps=-1). Set max_epochs or max_steps, or give {type(strategy).__name__}(noise_multiplier=...)."
                )
            try:
                strategy.noise_multiplier = self.budget.calibrate(q, max(int(remaining), 1))
            except ValueError:  # the history alone spends the budget: no step is allowed
                strategy.noise_multiplier = strategy.noise_multiplier or math.inf
        # Every process computes the same plan; rank 0's is broadcast so they cannot diverge.
        sigma = strategy.noise_multiplier = trainer.strategy.broadcast(strategy.noise_multiplier)
        assert sigma is not None
        limit = int(remaining) if math.isfinite(remaining) else None
        extra = trainer.strategy.broadcast(0 if math.isinf(sigma) else self.budget.max_steps(sigma, q, limit))
        self._allowed_steps = self.history.steps + extra
        self._planned_for = (sigma, q)
        self._planned_end = self.history.steps + remaining
        if not self.budget_changes or self.budget_changes[-1][1] != self.epsilon:
            self.budget_changes.append((self.history.steps, self.epsilon))
        self._plan_base = self.history.copy()
        self._table = None  # built when first logged
        rank_zero_info(
            f"PrivacyBudget{' (user-level)' if unit == 'user' else ''}: {self.budget.describe()}; noise multiplier "
            f"{sigma:.4g}, sample rate {q:.4g}; "
            f"{self.history.steps} steps spent, the budget allows {extra} more of the {remaining:g} planned."
        )
        if self._ledger is not None:
            self._reserve(trainer, sigma, q, min(extra, remaining))
        if extra == 0:
            self._stop(trainer)

    # ------------------------------------------------------------------ the dataset's ledger
    def _refresh_ledger_target(self, trainer: pl.Trainer) -> None:
        """Plan against what the dataset's ledger holds now, beside this fit's own reservation."""
        assert self._ledger is not None
        target = self._ledger.target(trainer)
        self.budget.targets = [t for t in self.budget.targets if not isinstance(t, LedgerTarget)] + [target]

    def _reserve(self, trainer: pl.Trainer, sigma: float, q: float, steps: float) -> None:
        """Reserve the planned run (``steps`` more at ``(sigma, q)``) in the ledger before the
        first step; a charge that does not fit stops the fit on every rank, data untouched."""
        assert self._ledger is not None
        planned = self.history.extended(sigma, q, int(steps)) if math.isfinite(steps) and steps > 0 else self.history
        unit = self._strategy.private.config.privacy_unit if self._strategy is not None else "example"
        self._ledger.reserve(trainer, self.run_id, self.history, planned, "training" if unit == "example" else "user-level")

    def _commit(self, trainer: Optional[pl.Trainer], release: bool = False) -> None:
        """Commit what this fit executed; with ``release``, end its record."""
        if self._ledger is not None:
            self._ledger.commit(trainer, self.history, self.epsilon_spent, release)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call teardown after an exception (or Ctrl-C): end the record here,
        # committing what ran, so that the reservation of the steps never taken is freed.
        self._commit(trainer, release=True)

    def _tuner_max_steps(self, trainer: pl.Trainer) -> Optional[int]:
        """The configured max_steps when a tuner runs its trial loops (this callback is then not
        among the Trainer's callbacks and max_steps is the tuner's), else ``None``."""
        if any(c is self for c in trainer.callbacks):  # type: ignore[attr-defined]
            return None
        return self._configured_max_steps

    # ------------------------------------------------------------------ enforcing (StepGuard)
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
        if self.history.steps < self._allowed_steps:
            return
        allows = (f"The privacy budget ({self.budget.describe()}) allows {self._allowed_steps} steps at noise "
                  f"multiplier {strategy.noise_multiplier:g} and sample rate {q:g}, all taken")
        if self._tuner_max_steps(trainer) is not None:
            raise PrivacyBudgetExhausted(
                f"{allows}, and a tuner (lr_find or scale_batch_size) asked for another: its trial steps are private "
                "steps on the ledger. Give the tuner fewer steps (num_training, steps_per_trial, max_trials), or the "
                "run a larger budget or more noise."
            )
        raise PrivacyBudgetExhausted(
            f"{allows}, yet the Trainer asked for another: something undid PrivacyBudget's stop or lowered the noise "
            "after it planned."
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
        if self.history.steps >= self._allowed_steps and not trainer.should_stop:
            self._stop(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after_step(trainer)
        if trainer._logger_connector.should_update_logs:
            self._log(pl_module)

    def _stop(self, trainer: pl.Trainer) -> None:
        assert self._strategy is not None and self._planned_for is not None
        sigma, q = self._strategy.noise_multiplier, self._planned_for[1]
        if sigma is not None and math.isfinite(sigma):
            following = compute_epsilon(self.history.extended(sigma, q, 1), self.delta, self.accountant)
            after = f"one more step would spend {following:.4g}"
        else:
            after = "no noise level allows another step"
        if self.history.steps >= self._planned_end:
            # The Trainer's own plan ends here too: say so rather than claim the budget stopped it.
            self.stopped_reason = (
                f"PrivacyBudget: the planned run ends ({plan_text(trainer)}) after {self.history.steps} private steps, "
                f"which is also the most the budget allows: {self.budget.describe_spent()}; {after}."
            )
        else:
            self.stopped_reason = (
                f"PrivacyBudget: stopping after {self.history.steps} private steps, the most the budget allows, before "
                f"the planned run's end ({plan_text(trainer)}): {self.budget.describe_spent()}; {after}."
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped_reason is not None or self._allowed_steps is None:
            return  # the budget ended the run, and said so
        more = self._allowed_steps - self.history.steps
        if self.history.steps >= self._planned_end:
            why = f"the planned run ended ({plan_text(trainer)})"
        else:
            why = "training stopped before the planned run's end, and not because of the budget (another callback, or the user)"
        self.stopped_reason = (
            f"PrivacyBudget: {why} after {self.history.steps} private steps; the budget would allow {more} more: "
            f"{self.budget.describe_spent()}."
        )
        rank_zero_info(self.stopped_reason)

    # ------------------------------------------------------------------ logging
    def _spend_table(self) -> SpendTable:
        """The plan's table of epsilon and risk by step, built on first use after each plan: the
        logged figures come from it, never from an accountant query per step."""
        if self._table is None:
            assert self._planned_for is not None
            sigma, q = self._planned_for
            base = self._plan_base
            steps = 0 if math.isinf(sigma) else max(int(min(self._allowed_steps or 0, self._planned_end)) - base.steps, 0)
            self._table = SpendTable.build(base, sigma, q, steps, self.delta, self.accountant,
                                           sorted({0.001, 0.01, *self.max_tpr_at_fpr}), self.kappa, risk=self.log_risk)
        return self._table

    def _log(self, pl_module: pl.LightningModule) -> None:
        strategy = self._strategy
        assert strategy is not None and strategy.noise_multiplier is not None and self._planned_for is not None
        table, k = self._spend_table(), self.history.steps - self._plan_base.steps
        # The plan's last step is logged with the accountant's own figure (the stop computed it),
        # so the curve ends on what the report says.
        metrics = {
            "dp/epsilon": table.epsilon(k) if k < table.steps else self.epsilon_spent,
            "dp/noise_multiplier": strategy.noise_multiplier,
            "dp/sample_rate": self._planned_for[1],
            "dp/steps": float(self.history.steps),
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

    # ------------------------------------------------------------------ the report
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report_at_fit_end:
            self.report(trainer)

    def record(self, trainer: Optional[pl.Trainer] = None) -> PrivacyRecord:
        """This run's privacy record, as plain data for :mod:`lightning_dp.report`. With
        ``trainer``, an attached audit runs first (once per ``fit``) and its result is included."""
        audit = None
        if trainer is not None:
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, AuditView) and callback is not self:
                    result = callback.run(trainer, trainer.lightning_module)
                    audit = None if result is None else result.to_dict()
                    break
        checks = self._strategy.safety_checks() if self._strategy is not None else None
        return PrivacyRecord(
            history=self.history.copy(), delta=self.delta, accountant=self.accountant, epsilon_budget=self.epsilon,
            max_advantage=self.max_advantage, max_tpr_at_fpr=dict(self.max_tpr_at_fpr), kappa=self.kappa,
            noise_multiplier=self.noise_multiplier, safety_checks=checks, audit=audit,
            stopped_reason=self.stopped_reason, run_id=self.run_id, resumed_at=tuple(self.resumed_at),
            budget_changes=tuple(self.budget_changes), ledger_verified=self.ledger_verified,
            dataset_ledger=self._ledger_summary(trainer),
        )

    def _ledger_summary(self, trainer: Optional[pl.Trainer]) -> Optional[dict[str, Any]]:
        if self._ledger is None or (trainer is not None and not trainer.is_global_zero):
            return None
        self._commit(trainer)  # the figures include this run's steps so far
        return self._ledger.summary()

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
        built = build_report(self.record(trainer))
        directories = [Path(directory)] if directory is not None else artefact_dirs(trainer)
        if trainer is None or trainer.is_global_zero:
            for where in directories:
                json_path, png_path = write_report(built, where, self.history)
                rank_zero_info(f"PrivacyBudget: privacy report written to {json_path} and {png_path.name}.")
            if show:
                print_report(built)
        return built

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        fields = {
            "history": self.history.state_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "max_advantage": self.max_advantage,
            "max_tpr_at_fpr": self.max_tpr_at_fpr,
            "kappa": self.kappa,
            "noise_multiplier": self.noise_multiplier,
            # For `python -m lightning_dp report CHECKPOINT`: the facts behind the guarantee.
            "safety_checks": self._strategy.safety_checks() if self._strategy is not None else None,
            "ledger_verified": self.ledger_verified,
            "marks": {"resumed_at": list(self.resumed_at), "budget_changes": [list(c) for c in self.budget_changes]},
        }
        # Each field with a digest of its value and the run's identity: an edited ledger is
        # refused on resume (lightning_dp.core.integrity, budget_state.py).
        return sealed(fields, self.run_id)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.rules.check_state(state_dict):
            self.ledger_verified = False
        if "run_id" in state_dict:
            self.run_id = str(state_dict["run_id"])
        loaded = PrivacyHistory()
        loaded.load_state_dict(state_dict["history"])
        self._absorb(loaded, source="the checkpoint")
        marks = state_dict.get("marks") or {}
        self.resumed_at = [int(s) for s in marks.get("resumed_at", [])] + [loaded.steps]
        self.budget_changes = [(int(s), None if e is None else float(e)) for s, e in marks.get("budget_changes", [])]
        epsilon, targets = stricter_targets(self.epsilon, self.delta, self.accountant, self.budget.targets, state_dict)
        if epsilon != self.epsilon or targets != self.budget.targets:
            self.budget = Budget(epsilon, self.delta, self.accountant, targets=targets, history=self.history)
            self._allowed_steps = None  # plan again under them

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        verified, self._verified_checkpoint = self._verified_checkpoint, None
        if checkpoint is not verified:  # else a DP strategy verified it as read from the file
            self.verify_checkpoint(checkpoint, pl_module.automatic_optimization)

    def verify_checkpoint(self, checkpoint: Mapping[str, Any], automatic_optimization: Optional[bool] = None) -> None:
        """Refuse a checkpoint whose steps the ledger does not cover, or whose ledger was not
        written with its weights and step (see :class:`~lightning_dp.lightning.budget_state.ResumeRules`)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not self.rules.check_checkpoint(state, checkpoint, automatic_optimization):
            self.ledger_verified = False
        self._verified_checkpoint = checkpoint

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._commit(trainer)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            bind_to_checkpoint(state, checkpoint)

    def _absorb(self, other: PrivacyHistory, source: str) -> None:
        """Merge another history into this one without ever forgetting a step."""
        mine = self.history
        if other is mine or other.steps == 0:
            return
        if mine.steps and other.is_prefix_of(mine):
            rank_zero_info(
                f"PrivacyBudget: keeping the {mine.steps - other.steps} private steps taken since {source} was "
                "written: privacy spent on the data cannot be unspent."
            )
        elif mine.steps and not mine.is_prefix_of(other):
            rank_zero_warn(
                f"PrivacyBudget: {source} records a different history ({other.steps} steps) than this callback "
                f"({mine.steps} steps); counting both."
            )
        mine.entries = other.merged(mine).entries


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
