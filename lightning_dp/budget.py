"""``PrivacyBudget``: how much privacy a run may spend, and making sure it spends no more."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

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
from lightning_dp.strategy import DPStrategy, _PrivateTraining

if TYPE_CHECKING:
    from lightning_dp.ddp import DPDDPStrategy

__all__ = ["PrivacyBudget", "PrivacyBudgetExhausted"]


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
      ``dp/sample_rate``, ``dp/steps`` and ``dp/delta`` on every logging step;
    * **checkpoints** the ledger of every step taken, so ``fit(ckpt_path=...)`` continues
      the spend exactly (a resume with another sample rate or noise adds a segment).

    Args:
        epsilon: the budget's epsilon (> 0).
        delta: the budget's delta, in (0, 1); should be well below 1/N for N examples.
        accountant: ``"prv"`` (default; tight numerical bound), ``"rdp"`` (looser, fast) or
            ``"gdp"`` (central-limit approximation: an estimate, not a bound).

    Attributes:
        epsilon_spent: epsilon at ``delta`` after the steps taken so far.
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
    """

    def __init__(self, epsilon: float, delta: float, accountant: AccountantName = "prv") -> None:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.accountant: AccountantName = accountant
        self._ledger = PrivacyHistory()
        self._strategy: Optional[DPStrategy | DPDDPStrategy] = None
        self._allowed_steps: Optional[int] = None
        self._planned_for: Optional[tuple[float, float]] = None  # (noise_multiplier, sample_rate)
        self._planned_end: float = math.inf  # the Trainer's last step
        self.stopped_reason: Optional[str] = None

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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._strategy is not None:
            self._strategy.budget = None

    # ------------------------------------------------------------------ planning
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan(trainer)

    def _plan(self, trainer: pl.Trainer) -> None:
        """Calibrate the noise if asked, and work out how many steps the budget allows."""
        strategy = self._strategy
        assert strategy is not None
        self.stopped_reason = None
        loader = strategy.train_dataloader
        if loader is None:
            return
        q = strategy.sample_rate
        n = len(loader.dataset)  # type: ignore[arg-type]
        if self.delta >= 1 / n:
            rank_zero_warn(
                f"PrivacyBudget(delta={self.delta:g}) is not below 1/N = {1 / n:.3g} for N={n} training examples: "
                "a mechanism that publishes one whole example would meet it. Use delta << 1/N."
            )
        planned_total = trainer.estimated_stepping_batches
        remaining = planned_total - trainer.global_step
        if strategy.requested_noise_multiplier is None:
            if not math.isfinite(remaining):
                raise ValueError(
                    "PrivacyBudget calibrates the noise over the planned run, but the Trainer has no end "
                    "(max_epochs=-1 and max_steps=-1). Set max_epochs or max_steps, or give "
                    "DPStrategy(noise_multiplier=...)."
                )
            try:
                strategy.noise_multiplier = calibrate_noise(
                    self._ledger, q, max(int(remaining), 1), self.epsilon, self.delta, self.accountant
                )
            except ValueError:  # the ledger alone spends the budget: no step is allowed
                strategy.noise_multiplier = strategy.noise_multiplier or math.inf
        # Every process computes the same plan; rank 0's is broadcast so they cannot diverge.
        sigma = strategy.noise_multiplier = trainer.strategy.broadcast(strategy.noise_multiplier)
        assert sigma is not None
        limit = int(remaining) if math.isfinite(remaining) else None
        extra = 0 if math.isinf(sigma) else max_steps(
            self._ledger, sigma, q, self.epsilon, self.delta, self.accountant, limit=limit
        )
        extra = trainer.strategy.broadcast(extra)
        self._allowed_steps = self._ledger.steps + extra
        self._planned_for = (sigma, q)
        self._planned_end = trainer.global_step + remaining
        rank_zero_info(
            f"PrivacyBudget: epsilon={self.epsilon:g}, delta={self.delta:g} ({self.accountant}); noise multiplier "
            f"{sigma:.4g}, sample rate {q:.4g}; {self._ledger.steps} steps spent, the budget allows "
            f"{extra} more of the {remaining:g} planned."
        )
        if extra == 0:
            self._stop(trainer)

    # ------------------------------------------------------------------ enforcing
    def ensure_step_allowed(self, trainer: pl.Trainer) -> None:
        """Raise unless one more private step fits the budget. Called by the strategy before
        it touches a batch: a last line of defence behind the clean stop."""
        strategy = self._strategy
        assert strategy is not None
        if self._allowed_steps is None or self._planned_for != (strategy.noise_multiplier, strategy.sample_rate):
            # Loops that run without this callback's hooks (the learning-rate finder swaps the
            # callbacks out) still take private steps, and a noise changed mid-run changes what
            # the budget allows: plan again.
            self._plan(trainer)
            assert self._allowed_steps is not None
        if self._ledger.steps >= self._allowed_steps:
            raise PrivacyBudgetExhausted(
                f"The privacy budget (epsilon={self.epsilon:g}, delta={self.delta:g}) allows {self._allowed_steps} "
                f"steps at noise multiplier {strategy.noise_multiplier:g}, all taken, yet the Trainer asked for "
                "another: something undid PrivacyBudget's stop or lowered the noise after it planned."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy = self._strategy
        assert self._allowed_steps is not None and strategy is not None
        if self._planned_for != (strategy.noise_multiplier, strategy.sample_rate):
            self._plan(trainer)  # the noise changed: what the budget allows changed with it
        if self._ledger.steps >= self._allowed_steps and not trainer.should_stop:
            self._stop(trainer)
        if trainer._logger_connector.should_update_logs:
            self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        strategy = self._strategy
        assert strategy is not None and strategy.noise_multiplier is not None
        metrics = {
            "dp/epsilon": self.epsilon_spent,
            "dp/noise_multiplier": strategy.noise_multiplier,
            "dp/sample_rate": strategy.sample_rate,
            "dp/steps": float(self._ledger.steps),
            "dp/delta": self.delta,
        }
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "dp/epsilon", batch_size=1)

    def _stop(self, trainer: pl.Trainer) -> None:
        strategy = self._strategy
        assert strategy is not None
        spent = self.epsilon_spent
        sigma, q = strategy.noise_multiplier, strategy.sample_rate
        if sigma is not None and math.isfinite(sigma):
            nxt = compute_epsilon(self._ledger.extended(sigma, q, 1), self.delta, self.accountant)
            after = f"one more step would spend {nxt:.4g}"
        else:
            after = "no noise level allows another step"
        what = "the planned run ends" if trainer.global_step >= self._planned_end else "stopping"
        self.stopped_reason = (
            f"PrivacyBudget: {what} after {self._ledger.steps} private steps, the most the budget allows: "
            f"epsilon={spent:.4g} of {self.epsilon:g} (delta={self.delta:g}, {self.accountant}); {after}."
        )
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self._ledger.state_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise ValueError("This PrivacyBudget state has no 'history': it was not written by PrivacyBudget.")
        loaded = PrivacyHistory()
        loaded.load_state_dict(state_dict["history"])
        self._absorb(loaded, source="the checkpoint")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        global_step = int(checkpoint.get("global_step", 0))
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
