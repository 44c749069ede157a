"""``PrivacyAudit``: a one-run empirical audit of a training run (Steinke, Nasr & Jagielski,
NeurIPS 2023). The bound itself is :mod:`lightning_dp.core.audit_bound`."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from lightning_dp.core.audit_bound import audit_p_value, epsilon_lower_bound
from lightning_dp.lightning.interfaces import BudgetView
from lightning_dp.mechanism.grads.engine import silenced_logging
from lightning_dp.mechanism.sampling import PoissonBatchSampler, _PoissonCollate

__all__ = ["AuditResult", "PrivacyAudit", "audit_p_value", "epsilon_lower_bound"]


# ---------------------------------------------------------------------- the audit callback


@dataclass(frozen=True)
class AuditResult:
    """What a one-run audit found.

    Attributes:
        epsilon_lower_bound: the largest epsilon the guesses rule out at confidence ``1 - p``
            (``0.0`` when they rule out none): a *lower* bound on the run's true epsilon.
        canaries: ``m``, the number of canaries drawn in or out.
        included: how many of them were drawn in (trained on).
        guesses: ``r``, the canaries guessed (the ``r/2`` highest scores "in", the ``r/2``
            lowest "out").
        correct: ``v``, the correct guesses.
        delta: the delta of the bound.
        p: the bound's significance level.
    """

    epsilon_lower_bound: float
    canaries: int
    included: int
    guesses: int
    correct: int
    delta: float
    p: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain, JSON-serialisable dict."""
        return asdict(self)


#: ``score_fn(module, batch)``: a number that rises as the model fits the one-canary ``batch``.
ScoreFn = Callable[["pl.LightningModule", Any], Union[float, Tensor]]


class _WithCanaries(Dataset):
    """The training set followed by the canaries its audit drew in.

    It reads the draws from its audit on every access, so restoring the audit from a
    checkpoint (before the Trainer builds its loaders) puts that run's canaries back in.
    """

    def __init__(self, train_set: Dataset, audit: PrivacyAudit) -> None:
        self.train_set = train_set
        self.audit = audit
        self._n = len(train_set)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._n + int(self.audit._included.sum())

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        if index < self._n:
            return self.train_set[index]
        return self.audit.canaries[int(self.audit._included.nonzero()[index - self._n])]


class PrivacyAudit(Callback):
    r"""Measure a lower bound on a training run's epsilon from that run alone (Steinke, Nasr
    & Jagielski, NeurIPS 2023).

    Each of ``m`` canaries is drawn into the training set independently with probability
    1/2, by this callback's own secret generator. After ``fit``, each canary is scored by
    how much the model came to fit it (by default: how much its training loss fell between
    the start and the end of training); the audit guesses "in" for the ``guesses / 2``
    highest scores and "out" for the ``guesses / 2`` lowest, counts the correct guesses
    ``v`` and reports the largest epsilon that ``v`` rules out at confidence ``1 - p``
    (:func:`epsilon_lower_bound`). The bound holds whatever the scores are, so it never
    claims more than the run shows; a bound above the accountant's epsilon means the
    training did not have the guarantee it reported.

    The result is logged as ``dp/audit/epsilon_lower_bound`` (with ``dp/audit/correct``,
    ``dp/audit/guesses`` and ``dp/audit/canaries``) to the Trainer's loggers at the end of
    ``fit``, kept in :attr:`result`, and written into the privacy report of a
    :class:`~lightning_dp.PrivacyBudget`.

    **The canaries are training data.** The ones drawn in are trained on like any other
    example: they enlarge ``N`` (so the sample rate ``q = batch_size / N`` and the
    accounting are for the data *with* them), cost utility (a random-label canary is noise
    to the task), and are covered by the run's (epsilon, delta) guarantee like every record.

    Args:
        canaries: a map-style dataset whose items look like the training set's.
        p: the significance level of the bound, in (0, 1).
        guesses: ``r``, how many canaries to guess, even, at most ``len(canaries)``;
            default all of them (rounded down to even). Guessing only the most confident
            can give a higher bound.
        delta: the delta to audit at; default the attached ``PrivacyBudget``'s delta.
        score_fn: ``score_fn(module, batch) -> float``, evaluated at the start and the end of
            training on each canary alone (a batch of one, collated by the training loader's
            ``collate_fn``, on the module's device, under ``torch.no_grad`` and ``eval()``);
            it must rise as the model fits the canary. The audit ranks canaries by that rise.
            Default: minus the loss that the module's own ``training_step`` returns (logging
            silenced). Required with manual optimization, whose ``training_step`` steps.
        seed: seed of the inclusion draws, for reproducible audits; default OS entropy.
            Give the same seed on every process in multi-process training (rank 0's draws
            are used everywhere).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> canaries = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
        >>> audit = PrivacyAudit(canaries, seed=0)
        >>> train_set = audit.insert(TensorDataset(torch.randn(1000, 4), torch.randint(0, 2, (1000,))))
        >>> len(train_set) == 1000 + audit.included
        True
        >>> # trainer = L.Trainer(strategy=DPStrategy(...), callbacks=[PrivacyBudget(...), audit]);
        >>> # trainer.fit(model, DataLoader(train_set, batch_size=64)); audit.result.epsilon_lower_bound
    """

    def __init__(
        self,
        canaries: Dataset,
        p: float = 0.05,
        guesses: Optional[int] = None,
        delta: Optional[float] = None,
        score_fn: Optional[ScoreFn] = None,
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(canaries, IterableDataset) or not hasattr(canaries, "__len__") or not hasattr(
            canaries, "__getitem__"
        ):
            raise TypeError(
                f"canaries must be a map-style Dataset (with __len__ and __getitem__), got {type(canaries).__name__}"
            )
        m = len(canaries)  # type: ignore[arg-type]
        if m < 2:
            raise ValueError(f"PrivacyAudit needs at least 2 canaries, got {m}")
        if not (isinstance(p, float) and 0 < p < 1):
            raise ValueError(f"p must be a float in (0, 1), got {p!r}")
        if guesses is None:
            guesses = m - m % 2
        if not (isinstance(guesses, int) and not isinstance(guesses, bool) and 2 <= guesses <= m and guesses % 2 == 0):
            raise ValueError(
                f"guesses must be an even integer between 2 and the number of canaries ({m}), got {guesses!r}"
            )
        if delta is not None and not (isinstance(delta, (int, float)) and 0 <= delta < 1):
            raise ValueError(f"delta must be a number in [0, 1) or None (the PrivacyBudget's), got {delta!r}")
        if score_fn is not None and not callable(score_fn):
            raise TypeError(f"score_fn must be callable as score_fn(module, batch), got {type(score_fn).__name__}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.canaries = canaries
        self.p = p
        self.guesses = guesses
        self.delta = None if delta is None else float(delta)
        self.score_fn = score_fn
        generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self._included = torch.rand(m, generator=generator) < 0.5
        self._start_scores: Optional[Tensor] = None
        self._collate: Optional[Callable[[list[Any]], Any]] = None
        self._delta_in_force: Optional[float] = None
        self._done = True  # nothing to audit before a fit starts
        #: The audit's finding after ``fit`` (``None`` before).
        self.result: Optional[AuditResult] = None

    @property
    def included(self) -> int:
        """How many canaries were drawn into the training set."""
        return int(self._included.sum())

    @property
    def state_key(self) -> str:
        return self._generate_state_key(canaries=len(self._included))

    def insert(self, train_set: Dataset) -> Dataset:
        """The training set followed by the canaries drawn in: train on what this returns.

        At the start of ``fit`` the callback checks that the training loader's dataset is
        exactly this one (not wrapped, subset or re-sampled) and refuses to run otherwise.
        """
        if isinstance(train_set, IterableDataset) or not hasattr(train_set, "__len__"):
            raise TypeError(
                "PrivacyAudit.insert needs a map-style training Dataset (with __len__ and __getitem__), got "
                f"{type(train_set).__name__}"
            )
        if isinstance(train_set, _WithCanaries):
            raise ValueError("This training set already holds an audit's canaries: insert them once.")
        return _WithCanaries(train_set, self)

    # ------------------------------------------------------------------ fit
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization and self.score_fn is None:
            raise ValueError(
                "PrivacyAudit's default score runs training_step, which with manual optimization steps the "
                "optimizers. Pass PrivacyAudit(..., score_fn=lambda module, batch: ...) returning a number that "
                "rises as the model fits the batch (e.g. minus its loss)."
            )
        delta = self.delta
        if delta is None:
            budgets = [c for c in trainer.callbacks if isinstance(c, BudgetView)]  # type: ignore[attr-defined]
            if not budgets:
                raise ValueError(
                    "PrivacyAudit audits at a delta: pass PrivacyAudit(..., delta=...) or add a PrivacyBudget callback."
                )
            delta = budgets[0].delta
        self._delta_in_force = delta
        if trainer.world_size > 1:
            # Each process drew its own canaries (from OS entropy unless seeded); they must
            # train on one set, and the datasets read the draws lazily, so adopt rank 0's.
            self._included = trainer.strategy.broadcast(self._included.clone())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = self._training_loader(trainer)
        self.result = None
        self._done = False
        if self._start_scores is None:
            self._start_scores = self._scores(trainer, pl_module)
            rank_zero_info(
                f"PrivacyAudit: {len(self._included)} canaries, {self.included} drawn into the training set of "
                f"{len(loader.dataset)} examples; scored before training."  # type: ignore[arg-type]
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[AuditResult]:
        """Score the canaries on the trained model, compute and log the bound (once per
        ``fit``; called at ``fit`` end, and by ``PrivacyBudget`` for its report)."""
        if self._done:
            return self.result
        self._done = True
        assert self._start_scores is not None and self._delta_in_force is not None
        rise = self._scores(trainer, pl_module) - self._start_scores
        self.result = _guess(rise, self._included, self.guesses, self._delta_in_force, self.p)
        metrics = {
            "dp/audit/epsilon_lower_bound": self.result.epsilon_lower_bound,
            "dp/audit/correct": float(self.result.correct),
            "dp/audit/guesses": float(self.result.guesses),
            "dp/audit/canaries": float(self.result.canaries),
        }
        for logger in trainer.loggers:  # self.log is not allowed once fit has ended
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"PrivacyAudit: {self.result.correct} of {self.result.guesses} guesses right on "
            f"{self.result.canaries} canaries: epsilon >= {self.result.epsilon_lower_bound:.4g} at confidence "
            f"{1 - self.p:g} (delta={self._delta_in_force:g})."
        )
        return self.result

    # ------------------------------------------------------------------ checks and scores
    def _training_loader(self, trainer: pl.Trainer) -> DataLoader:
        loader: Any = trainer.train_dataloader
        ours = isinstance(loader, DataLoader) and isinstance(loader.dataset, _WithCanaries) and (
            loader.dataset.audit is self
        )
        if not ours:
            raise ValueError(
                "PrivacyAudit: the Trainer's training loader does not hold this audit's canaries, so the audit "
                "would audit nothing. Train on a single DataLoader over `audit.insert(train_set)` itself (not "
                f"wrapped, subset or concatenated again); got {type(loader).__name__}"
                + (f" over {type(loader.dataset).__name__}" if isinstance(loader, DataLoader) else "")
                + "."
            )
        if getattr(loader, "privacy_unit", "example") == "user":
            raise ValueError(
                "PrivacyAudit inserts canary *examples* and measures example-level privacy; this run's privacy unit is "
                "the user (DPStrategy(privacy_unit='user')). Audit an example-level run, or leave PrivacyAudit out."
            )
        sampler, batch_sampler = loader.sampler, loader.batch_sampler
        n = len(loader.dataset)
        if isinstance(batch_sampler, PoissonBatchSampler):
            whole = len(range(trainer.global_rank, n, trainer.world_size)) if trainer.world_size > 1 else n
            covers = batch_sampler.num_samples == whole
        else:
            covers = isinstance(sampler, (SequentialSampler, DistributedSampler)) or (
                isinstance(sampler, RandomSampler) and sampler._num_samples is None
            )
        if not covers:
            raise ValueError(
                f"PrivacyAudit: the training loader's {type(batch_sampler or sampler).__name__} does not draw from "
                f"all {n} examples of the training set with its canaries; the canaries drawn in must be trained "
                "on like every example. Use DataLoader(audit.insert(train_set), batch_size=B, shuffle=True)."
            )
        collate = loader.collate_fn
        self._collate = collate.collate_fn if isinstance(collate, _PoissonCollate) else (collate or default_collate)
        return loader

    def _scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        assert self._collate is not None
        score = self.score_fn or _minus_training_loss
        scores = torch.empty(len(self._included), dtype=torch.float64)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), silenced_logging(pl_module):
                for i in range(len(scores)):
                    batch = trainer.strategy.batch_to_device(self._collate([self.canaries[i]]), pl_module.device)
                    scores[i] = float(score(pl_module, batch))
        finally:
            pl_module.train(was_training)
        return scores

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "included": self._included.tolist(),
            "start_scores": None if self._start_scores is None else self._start_scores.tolist(),
            "result": None if self.result is None else self.result.to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        included = torch.tensor(state_dict["included"], dtype=torch.bool)
        if len(included) != len(self._included):
            raise ValueError(
                f"The checkpoint's PrivacyAudit drew {len(included)} canaries, this one has {len(self._included)}: "
                "resume with the same canaries."
            )
        self._included = included
        scores = state_dict.get("start_scores")
        self._start_scores = None if scores is None else torch.tensor(scores, dtype=torch.float64)
        result = state_dict.get("result")
        self.result = None if result is None else AuditResult(**result)


def _minus_training_loss(module: pl.LightningModule, batch: Any) -> float:
    out = module.training_step(batch, 0)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "PrivacyAudit's default score needs training_step to return its loss (a scalar tensor, or a dict with "
            f"'loss'); got {type(loss).__name__}. Pass score_fn=..."
        )
    return -float(loss)


def _guess(rise: Tensor, included: Tensor, guesses: int, delta: float, p: float) -> AuditResult:
    """Guess "in" for the ``guesses/2`` canaries whose score rose most, "out" for the
    ``guesses/2`` whose rose least, and bound epsilon by the correct count."""
    # Any rule that depends on the model alone keeps the bound valid; NaN (a diverged score)
    # ranks in the middle rather than at an end.
    rise = torch.nan_to_num(rise, nan=0.0, posinf=math.inf, neginf=-math.inf)
    order = torch.argsort(rise, descending=True, stable=True)
    half = guesses // 2
    correct = int(included[order[:half]].sum()) + int((~included[order[len(order) - half :]]).sum())
    m = len(included)
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(m, guesses, correct, delta, p),
        canaries=m,
        included=int(included.sum()),
        guesses=guesses,
        correct=correct,
        delta=delta,
        p=p,
    )
