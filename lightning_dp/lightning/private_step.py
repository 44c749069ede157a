"""The private step: DP-SGD as a Lightning strategy runs it.

:class:`PrivateStep` is owned by :class:`~lightning_dp.DPStrategy` and
:class:`~lightning_dp.DPDDPStrategy` (as a Lightning strategy owns its precision plugin); the
strategies route their hooks to it. Per fit it:

* **loads the data** (``process_dataloader``): the training loader becomes a Poisson sampler
  (:mod:`lightning_dp.mechanism.sampling`) drawing from this fit's never-replayed random streams
  (:mod:`lightning_dp.mechanism.streams`);
* **chooses and checks the engine** (``on_train_start``) that computes per-example gradients
  (:mod:`lightning_dp.mechanism.grads.selection`), or under manual optimization hands the step
  to :mod:`lightning_dp.lightning.manual`;
* **computes** (``training_step``) each physical chunk's per-example gradients and adds them,
  clipped, to a :class:`~lightning_dp.mechanism.gaussian.GaussianMechanism`;
* **releases** (``release``, from the strategy's ``optimizer_step``): noise once, divide by the
  expected batch size, record the step in the history, and let the attached
  :class:`~lightning_dp.lightning.interfaces.StepGuard` (the budget) stop the Trainer.

Why one module of about 540 lines: these steps share the fit's state (the pending draw, the
engine, the mechanism, the streams) and run in an order Lightning's hooks fix; what does not
touch that state lives elsewhere (``trainer_checks.py``, ``routing.py``, ``logs.py``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dp.core.history import PrivacyHistory
from lightning_dp.lightning.config import PrivacyConfig
from lightning_dp.lightning.interfaces import DPHost, StepGuard
from lightning_dp.lightning.logs import logged_once_per_step
from lightning_dp.lightning.manual import ManualPrivacy
from lightning_dp.lightning.trainer_checks import (
    check_trainer,
    remove_warning_filter,
    step_loss,
)
from lightning_dp.mechanism.gaussian import GaussianMechanism
from lightning_dp.mechanism.grads.engine import PerSampleGradEngine
from lightning_dp.mechanism.grads.registry import make_engine
from lightning_dp.mechanism.grads.selection import (
    SPOT_CHECK_EVERY,
    SPOT_EXAMPLES,
    START_EXAMPLES,
    CheckExamples,
    check_examples,
    choose_engine,
    is_slow_fallback,
    spot_check,
    trainable,
)
from lightning_dp.mechanism.modules import UnsupportedModuleError, replace_batch_norm, unsupported_layers
from lightning_dp.mechanism.sampling import (
    EMPTY_DRAW,
    PoissonBatch,
    check_rows,
    collate_examples,
    empty_batch,
    is_poisson_dataloader,
    poisson_dataloader,
)
from lightning_dp.mechanism.streams import RandomStreams
from lightning_dp.mechanism.user_sampling import user_poisson_dataloader

__all__ = ["PrivateStep"]

# Lightning warns when training_step returns None; under DP that only happens on an empty
# Poisson draw (a user's None on a non-empty batch is an error), which is expected.
_EMPTY_STEP_WARNING = re.escape("`training_step` returned `None`")


class PrivateStep:
    """The DP-SGD mechanism of one strategy (see the module docstring).

    Args:
        config: the validated arguments.
        host: the strategy that owns this step.
        name: the strategy's class name, for messages.
    """

    def __init__(self, config: PrivacyConfig, host: DPHost, name: str) -> None:
        self.config = config
        self.host = host
        self.name = name
        #: The noise multiplier in force (``None`` until a budget calibrates it).
        self.noise_multiplier: Optional[float] = config.noise_multiplier
        #: Every private step this strategy took (shared with the budget, which checkpoints it).
        self.history = PrivacyHistory()
        #: What decides whether a step may run (a PrivacyBudget), or ``None``.
        self.guard: Optional[StepGuard] = None
        self.train_dataloader: Optional[DataLoader] = None
        #: The engine computing per-sample gradients, chosen at fit start.
        self.engine: Optional[PerSampleGradEngine] = None
        #: What the per-sample gradient check did (read by the privacy report); ``None`` before a fit.
        self.grad_check: Optional[dict[str, Any]] = None
        #: The draw of the step being taken (its chunks and sizes).
        self.last_draw: Optional[PoissonBatch] = None
        #: Examples whose gradient was not finite and that contributed nothing, this fit, on this
        #: process; and on all processes (summed when training ends).
        self.non_finite_examples = 0
        self.non_finite_examples_total = 0
        self.manual: Optional[ManualPrivacy] = None
        self._fitting = False
        self._fits = 0  # fits started, tuner trials included: a seeded stream never repeats
        self._streams: Optional[RandomStreams] = None
        self._loading_training_data = False
        self._training_loaders = 0
        self._marked_loop: Any = None
        self._engine_params: frozenset[nn.Parameter] = frozenset()
        self._mechanism: Optional[GaussianMechanism] = None
        self._pending: Optional[PoissonBatch] = None
        #: The clipping norm in force: the configured one, or where adaptive clipping moved it.
        self.clip_norm = config.max_grad_norm
        #: True while training_step runs for a per-sample gradient check (at the start of fit and
        #: at the spot checks) rather than for a step: stateful code (an EMA teacher, a list of
        #: losses) can skip its side effects then.
        self.checking = False

    @property
    def fitting(self) -> bool:
        return self._fitting

    @property
    def module(self) -> pl.LightningModule:
        module = self.host.lightning_module
        if module is None:
            raise RuntimeError(f"{self.name} has no LightningModule attached.")
        return module

    # ------------------------------------------------------------------ setup
    def connect(self, model: nn.Module) -> None:
        # Replace before a checkpoint is restored into the module, so its GroupNorm weights load.
        self._replace_batch_norm(model)

    def validate(self, trainer: pl.Trainer) -> None:
        """Refuse what DP training cannot honour, before anything runs (``setup``, fitting)."""
        check_trainer(trainer, self.config, self.host, self.module, self.name)
        self._replace_batch_norm(self.module)  # layers built in configure_model
        problems = unsupported_layers(self.module)
        if self.config.engine != "auto":
            problems += make_engine(self.config.engine).unsupported(self.module)
        if problems:
            raise UnsupportedModuleError(f"{self.name} cannot train this model as it is:\n  - " + "\n  - ".join(problems))

    def start_fit(self, trainer: pl.Trainer) -> None:
        """After the strategy's own setup, when fitting."""
        self._fitting = True
        self._fits += 1
        self.non_finite_examples = self.non_finite_examples_total = 0
        self._mark_training_data_loading(trainer)
        if self.config.seed is not None:
            rank_zero_warn(
                f"{self.name}(seed={self.config.seed}): the noise and the Poisson draws are reproducible from the seed. "
                "Use it for debugging only: anyone who knows the seed can recompute the noise, so the privacy guarantee "
                "holds only against someone who does not. Leave seed=None for OS entropy."
            )
        warnings.filterwarnings("ignore", message=_EMPTY_STEP_WARNING)

    def _mark_training_data_loading(self, trainer: pl.Trainer) -> None:
        # Lightning hands every loader to process_dataloader without saying which stage it is for,
        # and a tuner reloads the validation loader while the Trainer's stage is TRAINING. Only the
        # fit loop's setup_data loads the training data, so it alone marks what to Poisson-sample.
        fit_loop = trainer.fit_loop
        if "setup_data" in vars(fit_loop):
            return
        original = fit_loop.setup_data

        def setup_data() -> None:
            self._loading_training_data = True
            self._training_loaders = 0
            try:
                original()
            finally:
                self._loading_training_data = False

        fit_loop.setup_data = setup_data  # type: ignore[method-assign]
        self._marked_loop = fit_loop

    def _replace_batch_norm(self, module: nn.Module) -> None:
        if self.config.replace_batch_norm:
            replaced = replace_batch_norm(module)
            if replaced:
                rank_zero_info(f"{self.name}: replaced BatchNorm by GroupNorm in {', '.join(replaced)}.")

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.host.lightning_module.trainer if self.host.lightning_module is not None else None
        if trainer is None or not (self._fitting and self._loading_training_data):
            # Validation, test and predict loaders stay exactly as they are, also those a tuner
            # reloads while the Trainer's stage still says TRAINING (scale_batch_size does).
            return dataloader
        self._training_loaders += 1
        if self._training_loaders > 1:
            raise TypeError(
                f"{self.name} trains on one training DataLoader; this fit has several (a list or dict of loaders, or "
                "a CombinedLoader). Each loader would be Poisson-sampled and accounted on its own while their batches "
                "train together. Concatenate the datasets (torch.utils.data.ConcatDataset) into one DataLoader."
            )
        if is_poisson_dataloader(dataloader):
            if dataloader is self.train_dataloader:
                return dataloader  # this fit's own loader, handed back
            raise TypeError(
                "The training DataLoader is already Poisson-sampled (built with lightning_dp.mechanism.sampling."
                f"poisson_dataloader): {self.name} Poisson-samples the training loader itself, with this fit's random "
                "streams and, across processes, each process's shard. Pass the plain DataLoader(dataset, batch_size=B)."
            )
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"DP training needs a torch DataLoader to Poisson-sample, got {type(dataloader).__name__}.")
        rank, world_size = self.host.dp_shard()
        self.train_dataloader = poisson_dataloader(
            dataloader, self.config.max_physical_batch_size, self.config.secure_mode, rank=rank,
            world_size=world_size, generator=self._fit_streams(trainer).sampling,
        )
        if self.config.privacy_unit == "user":
            assert self.config.max_examples_per_user is not None
            self.train_dataloader = user_poisson_dataloader(
                dataloader, self.config.user_ids, self.config.max_examples_per_user,
                self.config.max_physical_batch_size, self.config.secure_mode, rank=rank, world_size=world_size,
                generator=self._fit_streams(trainer).sampling,
            )
            if world_size > 1:
                digest = self.train_dataloader.user_digest  # type: ignore[attr-defined]
                same = digest == trainer.strategy.broadcast(digest)
                if not trainer.strategy.reduce_boolean_decision(same, all=True):
                    raise ValueError(
                        f"{self.name}: the processes computed different user ids (or orders of them) for the training "
                        "set, so one person could be sharded to two processes. Make user_ids deterministic (the same "
                        "dataset order and ids on every process)."
                    )
        return self.train_dataloader

    def _fit_streams(self, trainer: pl.Trainer) -> RandomStreams:
        """This fit's random streams, made when the training data is first loaded (after a
        checkpoint's step is restored) and kept for the whole fit: a tuner's reloads and trial
        loops continue them rather than start them again."""
        if self._streams is None:
            rank, _ = self.host.dp_shard()
            self._streams = RandomStreams(self.config.seed, rank, trainer.global_step, self._fits)
        return self._streams

    def streams(self) -> RandomStreams:
        if self._streams is None:
            raise RuntimeError(f"{self.name}: the training data was never loaded through process_dataloader.")
        return self._streams

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate ``q`` of the training loader."""
        if self.train_dataloader is None:
            raise RuntimeError("The training loader has not been set up yet.")
        return self.train_dataloader.batch_sampler.sample_rate  # type: ignore[union-attr]

    def _next_draw(self) -> PoissonBatch:
        """The Poisson draw of the batch about to train: the oldest one the training loader
        yielded and no step has taken yet."""
        draws = getattr(self.train_dataloader, "draws", None)
        if not draws:
            raise RuntimeError(
                f"{self.name} received a training batch that was not Poisson-sampled; the privacy guarantee would not "
                f"hold. Batches must come from the training DataLoader that {self.name}.process_dataloader prepared."
            )
        return draws.popleft()  # type: ignore[no-any-return]

    def prepare(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """A collated batch made ready exactly as Lightning's training loop makes its own: the
        precision plugin's ``convert_input``, the module's ``on_before_batch_transfer``, then
        ``batch_to_device`` (``transfer_batch_to_device``, ``on_after_batch_transfer``). The check
        and the physical chunks go through this, so what they verify is what trains."""
        batch = self.host.precision_plugin.convert_input(batch)
        batch = self.module._on_before_batch_transfer(batch, dataloader_idx)
        return self.host.plain_batch_to_device(batch, dataloader_idx)

    def _chunks_on_device(self, draw: PoissonBatch, batch: Any, dataloader_idx: int = 0) -> list[Any]:
        """The physical batches of ``draw`` on the device. A draw that fits one physical batch is
        the batch Lightning already prepared (the user's hooks ran on it once); the chunks of a
        larger one each go through the user's hooks as a batch of their own."""
        if not draw.split:
            chunks = [batch] if draw.size else []
        else:
            chunks = [self.prepare(c, dataloader_idx) for c in draw.chunks]
        for chunk, size in zip(chunks, draw.sizes):
            check_rows(chunk, size, self.name)
        return chunks

    def device_batch(self, batch: Any) -> Any:
        """What the strategy's ``batch_to_device`` hands on for a training batch. Lightning skips
        a ``None`` batch without calling ``training_step``, which would leave its draw to pair with
        the next batch: an empty draw whose batch cannot be built becomes :data:`EMPTY_DRAW` (a
        noise-only step, as for any empty draw), and ``None`` for a draw of examples is refused."""
        draws = getattr(self.train_dataloader, "draws", None)
        trainer = self.host.lightning_module.trainer if self.host.lightning_module is not None else None
        if batch is not None or not draws or trainer is None or not trainer.training:
            return batch
        if draws[0].size == 0:
            return EMPTY_DRAW
        raise RuntimeError(
            f"The training batch of {draws[0].size} Poisson-sampled examples became None in a batch hook "
            "(on_before_batch_transfer, transfer_batch_to_device or on_after_batch_transfer). Lightning skips a None "
            "batch, but under DP every sampled batch must produce a step: skipping one depending on the data would "
            "itself leak information. Return the batch from these hooks."
        )

    # ------------------------------------------------------------------ start
    def on_train_start(self) -> None:
        trainer = self.module.trainer
        if self.guard is not None:
            # Plan here, not only in the callback's own hook: tuners (lr_find, scale_batch_size)
            # run the fit loop with the Trainer's callbacks swapped out, and their steps are private
            # steps like any other.
            self.guard.ensure_planned(trainer)
        if self.noise_multiplier is None:
            raise ValueError(
                f"{self.name}(noise_multiplier=None) asks for the noise to be calibrated, but no PrivacyBudget "
                "callback is attached. Add callbacks=[PrivacyBudget(epsilon=..., delta=...)] or set noise_multiplier."
            )
        if self.noise_multiplier == 0:
            rank_zero_warn(f"{self.name}: noise_multiplier=0 adds no noise; this run is NOT differentially private.")
        adaptive = self.config.adaptive_clipping
        if adaptive is not None and self.train_dataloader is not None:
            # Refuse a count noise too small for the noise multiplier before any step, not at the first release.
            collate: Any = self.train_dataloader.collate_fn
            expected = float(collate.expected_size)
            adaptive.gradient_noise_multiplier(self.noise_multiplier, adaptive.count_std(expected, self.noise_multiplier))
        if self.guard is None:
            rank_zero_warn(
                f"{self.name} is training without a PrivacyBudget callback: the mechanism runs, but nothing tracks, "
                "logs or limits the privacy spent."
            )
        if not self.module.automatic_optimization:
            self._start_manual()
            return
        if not self.config.check_per_sample_grads:
            rank_zero_warn(
                f"{self.name}(check_per_sample_grads=False): per-sample gradients are not verified for this model; "
                "if they are wrong, the privacy guarantee does not hold."
            )
        self._choose_engine()

    def _start_manual(self) -> None:
        """Manual optimization: no engine; per-example gradients come from the per-example loss
        given to ``manual_backward`` (``manual.py``)."""
        loader = self.train_dataloader
        assert loader is not None
        if not self.config.check_per_sample_grads:
            rank_zero_warn(
                f"{self.name}(check_per_sample_grads=False): the per-example gradients of the private loss are not "
                "checked against one backward pass per example, nor for cross-talk between examples."
            )
        collate: Any = loader.collate_fn
        if collate.empty is None:
            # training_step runs on empty draws too under manual optimization: say why none can be built.
            empty_batch(collate.collate_fn, loader.dataset[0])
        # The manual path checks on its first draw of two or more examples (raising on a mismatch)
        # and records it here then: until that draw, nothing is verified.
        self.grad_check = {"engine": "manual", "verified": False, "examples": 0}
        self.manual = ManualPrivacy(self, self.module.trainer.optimizers, self.config.private_optimizers,
                                    self.config.check_per_sample_grads)

    def _choose_engine(self) -> None:
        if self.engine is not None:
            self.engine.detach()
        self.engine = None
        self.grad_check = None
        with self._checking():
            examples = self._examples(START_EXAMPLES) if self.config.check_per_sample_grads else None
            choice = choose_engine(self.module, self.config.engine, self.config.loss_reduction, examples, self.name)
        self.engine, self.grad_check = choice.engine, choice.check
        self._engine_params = frozenset(trainable(self.module))
        rank_zero_info(choice.message)
        if is_slow_fallback(choice):
            rank_zero_warn(
                f"{self.name}: training with the slow '{choice.check['engine']}' engine, because the faster ones cannot "
                "compute this model's per-sample gradients exactly:"
                + "".join(f"\n  - '{n}': {why}" for n, why in choice.rejected.items())
            )

    def _examples(self, count: int, batch_idx: int = 0) -> Optional[CheckExamples]:
        loader = self.train_dataloader
        if loader is None:
            return None
        return check_examples(
            loader.dataset, count, self.streams().check,
            lambda items: self.prepare(collate_examples(loader, items)),
            lambda b: self._run_training_step(b, batch_idx, full_precision=True),
            self.config.max_physical_batch_size,
        )

    @contextmanager
    def _checking(self) -> Iterator[None]:
        self.checking = True
        try:
            yield
        finally:
            self.checking = False

    def _spot_check(self, batch_idx: int) -> None:
        """At unpredictable steps (about one in ``SPOT_CHECK_EVERY``), check again on a few fresh
        examples, at the step and ``batch_idx`` training is at."""
        if self.engine is None or not self.config.check_per_sample_grads:
            return
        if int(torch.randint(SPOT_CHECK_EVERY, (1,), generator=self.streams().check)) != 0:
            return
        examples = self._examples(SPOT_EXAMPLES, batch_idx)
        if examples is None:
            return
        with self._checking():
            spot_check(self.engine, self.module, examples, self.config.loss_reduction, self.module.trainer.global_step)
        if isinstance(self.grad_check, dict):
            self.grad_check["spot_checks"] = int(self.grad_check.get("spot_checks", 0)) + 1

    # ------------------------------------------------------------------ the step
    def _run_training_step(self, batch: Any, *args: Any, full_precision: bool = False, **kwargs: Any) -> tuple[Any, Tensor]:
        precision = self.host.precision_plugin
        # The check runs mixed-precision models in float32: it verifies the engine's arithmetic,
        # which does not depend on the precision, at a tolerance bf16 rounding would swamp.
        autocast = not (full_precision and isinstance(precision, MixedPrecision))
        with precision.train_step_context() if autocast else nullcontext():
            output = self.module.training_step(batch, *args, **kwargs)
        loss = step_loss(output)
        if loss is None:
            raise RuntimeError(
                "training_step returned None on a non-empty batch. Under DP every sampled batch must produce a step: "
                "skipping one depending on the data would itself leak information."
            )
        return output, loss

    def training_step(self, batch: Any, rest: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        draw = self._next_draw()
        self.last_draw = draw
        if self.noise_multiplier is None:
            raise RuntimeError(f"{self.name} has no noise multiplier in force; see on_train_start's error.")
        if self._pending is not None:
            raise RuntimeError("A private gradient was computed but never released by an optimizer step.")
        if self.guard is not None:
            # The rate this batch was drawn with, not a loader's: whatever loader the batch came
            # from, the budget plans and the ledger records the rate that actually trains.
            self.guard.ensure_step_allowed(self.module.trainer, draw.sample_rate)
        if self.manual is not None:
            return self._manual_training_step(draw, batch, rest, kwargs)
        if self.config.adaptive_clipping is not None:
            self.module.log("dp/max_grad_norm", self.clip_norm, on_step=True, on_epoch=False, batch_size=1)
        params = trainable(self.module)
        if frozenset(params) != self._engine_params:
            # A callback (e.g. BaseFinetuning) froze or unfroze layers: hooks and the check were
            # made for the old set, so choose and verify the engine again for the new one.
            rank_zero_info(f"{self.name}: the trainable parameters changed; checking the engine again.")
            self._choose_engine()
        assert self.engine is not None
        self._spot_check(rest[0] if rest and isinstance(rest[0], int) else 0)
        mechanism = self.new_mechanism(params)
        output: Any = None
        loss_sum: Optional[Tensor] = None
        with logged_once_per_step(self.module) as logs:
            units = draw.units or (None,) * len(draw.sizes)
            for chunk, size, unit in zip(self._chunks_on_device(draw, batch), draw.sizes, units):
                logs.chunk_size = size
                output, loss, grads = self.engine.compute(
                    lambda b: self._run_training_step(b, *rest, **kwargs), chunk, params, size,
                    self.config.loss_reduction,
                )
                mechanism.add(grads, units=unit)  # user-level: each user's summed gradient is clipped
                loss_sum = loss * size if loss_sum is None else loss_sum + loss * size
        self._mechanism, self._pending = mechanism, draw
        if loss_sum is None:
            return self.host.dp_empty_step_output()  # empty draw: no training_step, but the noise-only step happens
        mean_loss = loss_sum / draw.size
        if isinstance(output, Mapping):  # the last chunk's extra outputs, with the batch's mean loss
            return {**output, "loss": mean_loss}
        return mean_loss

    def _manual_training_step(self, draw: PoissonBatch, batch: Any, rest: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        module, manual = self.module, self.manual
        assert manual is not None

        def run(data: Any) -> Any:
            with logged_once_per_step(module) as logs, self.host.precision_plugin.train_step_context():
                logs.chunk_size = max(draw.size, 1)
                return module.training_step(data, *rest, **kwargs)

        return manual.training_step(draw, batch, run)

    def release(self) -> None:
        """The automatic-optimization release: noise, divide, record (before the optimizer steps)."""
        draw, mechanism = self._pending, self._mechanism
        if draw is None or mechanism is None:
            raise RuntimeError(f"The optimizer stepped without a private gradient from {self.name}.training_step.")
        assert self.noise_multiplier is not None
        adaptive = self.config.adaptive_clipping
        if adaptive is None:
            mechanism.release(self.noise_multiplier, draw.expected_size, add_noise=self.host.dp_adds_noise,
                              all_reduce=self.host.dp_all_reduce)
        else:
            # The gradient and the count of unclipped examples together are one Gaussian mechanism
            # at self.noise_multiplier, what the history records (adaptive_clipping.py).
            count_std = adaptive.count_std(draw.expected_size, self.noise_multiplier)
            sigma_g = adaptive.gradient_noise_multiplier(self.noise_multiplier, count_std)
            count = mechanism.release(sigma_g, draw.expected_size, add_noise=self.host.dp_adds_noise,
                                      all_reduce=self.host.dp_all_reduce, count_noise_std=count_std)
            assert count is not None
            self.clip_norm = adaptive.next_norm(self.clip_norm, count, draw.expected_size)
        self.recorded(mechanism, self.noise_multiplier, draw.sample_rate)
        self._pending = self._mechanism = None

    def recorded(self, mechanism: GaussianMechanism, noise_multiplier: float, sample_rate: float) -> None:
        """Book one released private step: in the history, and with the guard, which stops the
        Trainer if no further step is allowed."""
        self.history.record(noise_multiplier, sample_rate)
        self._count_non_finite(mechanism)
        if self.guard is not None:
            self.guard.after_step(self.module.trainer)

    def new_mechanism(self, params: Sequence[nn.Parameter]) -> GaussianMechanism:
        return GaussianMechanism(params, self.clip_norm, self.config.secure_mode, self.streams())

    def _count_non_finite(self, mechanism: GaussianMechanism) -> None:
        if not mechanism.dropped:
            return
        first = self.non_finite_examples == 0
        self.non_finite_examples += mechanism.dropped
        if first:
            rank_zero_warn(
                f"{self.name}: {mechanism.dropped} training example(s) in a step had a non-finite gradient (NaN or inf "
                "in their data or loss) and contributed nothing to the update; clipping bounds every example's "
                "influence, so this costs no privacy, but check your data. The total is given when training ends."
            )

    # ------------------------------------------------------------------ end
    def on_train_end(self) -> None:
        count = torch.tensor([float(self.non_finite_examples)], device=self.host.root_device)
        self.host.dp_all_reduce([count])  # every process's examples
        self.non_finite_examples_total = int(count.item())
        if self.non_finite_examples_total:
            rank_zero_warn(
                f"{self.name}: {self.non_finite_examples_total} training example(s) had a non-finite gradient during "
                "this fit and contributed nothing to the updates."
            )

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.detach()
        self._fitting = False
        self._pending = self._mechanism = None
        self.manual = None
        self._streams = None
        loop = self._marked_loop
        if loop is not None and "setup_data" in vars(loop):
            del loop.setup_data  # back to the class's method
        self._marked_loop = None
        remove_warning_filter(_EMPTY_STEP_WARNING)

    def safety_checks(self) -> dict[str, Any]:
        """The facts behind the guarantee, as plain data for the privacy report: Poisson
        sampling of the training loader, secure mode, the per-sample gradient check, and whether
        examples were dropped for non-finite gradients (only whether: the count is private data).

        ``passed`` is true only when the loader was Poisson-sampled and the per-sample gradients
        were verified on at least one example (a failed check stops ``fit``). The manual path
        checks on its first draw of two or more examples: a run that never drew two is not verified.
        """
        loader = self.train_dataloader
        poisson = loader is not None and is_poisson_dataloader(loader)
        check = self.grad_check
        verified = bool(check and check.get("verified") and check.get("examples"))
        return {
            "privacy_unit": self.config.privacy_unit,
            "max_examples_per_user": self.config.max_examples_per_user,
            "poisson_sampling": poisson,
            "secure_mode": bool(self.config.secure_mode),
            "per_sample_gradient_check": None if check is None else dict(check),
            "non_finite_examples_dropped": bool(self.non_finite_examples_total),
            "passed": bool(poisson and verified),
        }
