"""``DPStrategy``: wires the DP-SGD mechanism into Lightning's training loop.

Where each part of a step happens:

* ``process_dataloader``: the training loader becomes a Poisson sampler (``sampling.py``).
* ``training_step``: for each physical chunk of the Poisson batch, the user's
  ``training_step`` runs and the engine turns its loss into per-example gradients
  (``grads/``), which are clipped and summed (``mechanism.py``).
* ``optimizer_step``: after the closure, noise is added once, the sum is divided by the
  expected batch size, the step is recorded in :attr:`DPStrategy.history`, and the user's
  optimizer steps.
* ``on_train_start``: the per-sample gradients are checked against one-example backward
  passes before any private step.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, NamedTuple, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dp.accounting import PrivacyHistory
from lightning_dp.grads import PerSampleGradientMismatch, check_per_sample_grads, make_engine
from lightning_dp.grads.check import RTOL, LossNotPerExample, Reference, no_dropout, reference_grads
from lightning_dp.grads.engine import (
    ENGINES,
    LossReduction,
    PerSampleGradEngine,
    metrics_kept,
    param_names,
    silenced_logging,
)
from lightning_dp.manual import _ManualPrivacy
from lightning_dp.mechanism import GaussianMechanism
from lightning_dp.modules import UnsupportedModuleError, replace_batch_norm, unsupported_layers
from lightning_dp.streams import RandomStreams
from lightning_dp.sampling import (
    PoissonBatch,
    collate_examples,
    empty_batch,
    is_poisson_dataloader,
    poisson_dataloader,
)

if TYPE_CHECKING:
    from lightning_dp.budget import PrivacyBudget

__all__ = ["DPStrategy"]

# Lightning warns when training_step returns None; under DP that only happens on an empty
# Poisson draw (a user's None on a non-empty batch is an error), which is expected.
_EMPTY_STEP_WARNING = re.escape("`training_step` returned `None`")

#: Examples the start-of-fit check draws (one per slice of the training set), and draws tried
#: per slice to find one whose data is finite.
_CHECK_EXAMPLES = 8
_CHECK_TRIES = 8
#: Engines ``"auto"`` falls back to only when the fast ones fail, with a warning that says why.
_SLOW_ENGINES = ("functorch", "loop")


#: A spot check runs at about one step in this many, on this many fresh examples.
_SPOT_CHECK_EVERY = 64
_SPOT_CHECK_EXAMPLES = 4


class _CheckExamples(NamedTuple):
    n: int
    batch_of: Callable[[Any], Any]
    step: Callable[[Any], tuple[Any, Tensor]]
    least: int  # examples with a finite loss needed


@contextmanager
def _buffers_unchanged(module: nn.Module) -> Iterator[None]:
    """Refuse a model whose floating-point buffers ``training_step`` changes: a buffer updated from
    the data in the forward pass (running statistics) is part of the model and would be released
    without clipping or noise."""
    before = {name: b.detach().clone() for name, b in module.named_buffers() if b.is_floating_point()}
    yield
    changed = [name for name, b in module.named_buffers() if name in before and not torch.equal(before[name], b)]
    if changed:
        raise LossNotPerExample(
            f"training_step changes the floating-point buffer(s) {', '.join(changed[:5])}: a buffer updated from "
            "the training data in the forward pass (running statistics, an exponential moving average of "
            "activations) is released with the model without clipping or noise. Compute such statistics outside "
            "the private training step, or from public data."
        )


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


class _PrivateTraining:
    """The DP-SGD mechanism wired into a Lightning strategy's hooks; mixed into
    :class:`DPStrategy` (one device) and :class:`~lightning_dp.DPDDPStrategy` (many processes)."""

    lightning_module: Any
    precision_plugin: Any

    def _init_private(
        self,
        max_grad_norm: float,
        noise_multiplier: Optional[float],
        max_physical_batch_size: Optional[int],
        secure_mode: bool,
        loss_reduction: LossReduction,
        engine: str,
        check_per_sample_grads: bool,
        replace_batch_norm: bool,
        private_optimizers: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
    ) -> None:
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed must be None (OS entropy, the safe default) or an int, got {seed!r}")
        if noise_multiplier is not None and not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a number >= 0 or None, got {noise_multiplier!r}")
        if max_physical_batch_size is not None and not (
            isinstance(max_physical_batch_size, int) and max_physical_batch_size > 0
        ):
            raise ValueError(f"max_physical_batch_size must be a positive int or None, got {max_physical_batch_size!r}")
        if engine != "auto" and engine not in ENGINES:
            raise ValueError(f"engine must be 'auto' or one of {list(ENGINES)}, got {engine!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if private_optimizers is not None and not (
            isinstance(private_optimizers, Sequence)
            and not isinstance(private_optimizers, str)
            and len(private_optimizers) > 0
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in private_optimizers)
            and len(set(private_optimizers)) == len(private_optimizers)
        ):
            raise ValueError(
                "private_optimizers must be None (all optimizers are private) or a non-empty list of distinct "
                f"optimizer indices >= 0, in configure_optimizers' order; got {private_optimizers!r}"
            )
        self.max_grad_norm = float(max_grad_norm)
        self.requested_noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.noise_multiplier: Optional[float] = self.requested_noise_multiplier
        self.max_physical_batch_size = max_physical_batch_size
        self.secure_mode = secure_mode
        self.loss_reduction: LossReduction = loss_reduction
        self.check_per_sample_grads = check_per_sample_grads
        self.replace_batch_norm = replace_batch_norm
        self.private_optimizers = None if private_optimizers is None else list(private_optimizers)
        self.seed = seed
        self.engine_name = engine
        #: The engine computing per-sample gradients, chosen at fit start.
        self.engine: Optional[PerSampleGradEngine] = None
        #: The ledger of every noisy step this strategy took (shared with PrivacyBudget).
        self.history = PrivacyHistory()
        self.budget: Optional[PrivacyBudget] = None
        self.train_dataloader: Optional[DataLoader] = None
        self._mechanism: Optional[GaussianMechanism] = None
        self._pending: Optional[PoissonBatch] = None
        self.last_draw: Optional[PoissonBatch] = None
        self._dp_fitting = False
        #: The random streams (sampling, noise, the check's examples) of the current fit.
        self._streams: Optional[RandomStreams] = None
        self._fits = 0  # fits started, tuner trials included: a seeded stream never repeats
        self._loading_training_data = False
        self._marked_loop: Any = None
        #: Examples whose gradient was not finite and that contributed nothing, this fit, on this
        #: process; and on all processes (summed when training ends).
        self.non_finite_examples = 0
        self.non_finite_examples_total = 0
        self._engine_params: frozenset[nn.Parameter] = frozenset()
        #: What the start-of-fit per-sample gradient check did (read by the privacy report):
        #: ``{"engine", "verified", "examples", "worst_relative_error"}``; ``None`` before a fit.
        self.grad_check: Optional[dict[str, Any]] = None
        #: The manual-optimization state of the current fit (``None`` with automatic optimization).
        self._manual: Optional[_ManualPrivacy] = None

    # ------------------------------------------------------------------ multi-process hooks
    def _shard(self) -> tuple[int, int]:
        """(this process's rank, number of processes) for sampling."""
        return 0, 1

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` in place over processes (nothing to do on one)."""

    @property
    def _adds_noise(self) -> bool:
        """Whether this process adds the step's noise (exactly one process does)."""
        return True

    def _empty_step_output(self) -> Any:
        return None

    # ------------------------------------------------------------------ setup
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        # Replace before a checkpoint is restored into the module, so its GroupNorm weights load.
        self._replace_batch_norm(model)

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_trainer(trainer)
            module = self.lightning_module
            assert module is not None
            self._replace_batch_norm(module)  # layers built in configure_model
            problems = unsupported_layers(module)
            if self.engine_name != "auto":
                problems += make_engine(self.engine_name).unsupported(module)
            if problems:
                raise UnsupportedModuleError(
                    "DPStrategy cannot train this model as it is:\n  - " + "\n  - ".join(problems)
                )
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._dp_fitting = True
            self._fits += 1
            self.non_finite_examples = self.non_finite_examples_total = 0
            self._mark_training_data_loading(trainer)
            if self.seed is not None:
                rank_zero_warn(
                    f"{type(self).__name__}(seed={self.seed}): the noise and the Poisson draws are reproducible from "
                    "the seed. Use it for debugging only: anyone who knows the seed can recompute the noise, so the "
                    "privacy guarantee holds only against someone who does not. Leave seed=None for OS entropy."
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
            try:
                original()
            finally:
                self._loading_training_data = False

        fit_loop.setup_data = setup_data  # type: ignore[method-assign]
        self._marked_loop = fit_loop

    def _replace_batch_norm(self, module: nn.Module) -> None:
        if self.replace_batch_norm:
            replaced = replace_batch_norm(module)
            if replaced:
                rank_zero_info(f"DPStrategy: replaced BatchNorm by GroupNorm in {', '.join(replaced)}.")

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if module.automatic_optimization:
            if self.private_optimizers is not None:
                raise ValueError(
                    f"DPStrategy(private_optimizers={self.private_optimizers}) applies to manual optimization "
                    "(automatic_optimization = False); with automatic optimization the one optimizer is private. "
                    "Remove private_optimizers."
                )
        else:
            self._check_manual_optimization()
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported "
                "with DP: gradient accumulation breaks Poisson sampling (each accumulated batch would be "
                "a separate draw normalised twice). For large logical batches in bounded memory use a "
                "larger DataLoader batch_size with DPStrategy(max_physical_batch_size=...)."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the already noised, "
                "averaged gradient, not each example's. Remove it and set DPStrategy(max_grad_norm=...)."
            )
        precision = self.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is not None:
            raise ValueError(
                "precision='16-mixed' uses a gradient scaler that DP-SGD's per-sample gradients bypass. "
                "Use precision='bf16-mixed' or '32-true'."
            )

    def _check_manual_optimization(self) -> None:
        if not isinstance(self, SingleDeviceStrategy):
            raise ValueError(
                f"{type(self).__name__} does not support manual optimization (automatic_optimization = False): "
                "use DPStrategy on one device, or automatic optimization."
            )
        ignored = [f"{name}={value!r}" for name, value, default in (
            ("engine", self.engine_name, "auto"), ("loss_reduction", self.loss_reduction, "mean")) if value != default]
        if ignored:
            rank_zero_warn(
                f"DPStrategy({', '.join(ignored)}) has no effect with manual optimization: the per-example "
                "gradients come from the per-example loss given to manual_backward (shape (batch size,)), "
                "differentiated exactly by autograd."
            )
        if self.max_physical_batch_size is not None:
            raise ValueError(
                f"DPStrategy(max_physical_batch_size={self.max_physical_batch_size}) is not supported with manual "
                "optimization: training_step takes each Poisson batch whole, as it steps the optimizers itself. "
                "Remove max_physical_batch_size, or lower the DataLoader's batch_size."
            )

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not (self._dp_fitting and self._loading_training_data):
            # Validation, test and predict loaders stay exactly as they are, also those a tuner
            # reloads while the Trainer's stage still says TRAINING (scale_batch_size does).
            return dataloader
        if is_poisson_dataloader(dataloader):
            if dataloader is self.train_dataloader:
                return dataloader  # this fit's own loader, handed back
            raise TypeError(
                "The training DataLoader is already Poisson-sampled (built with lightning_dp.sampling."
                f"poisson_dataloader): {type(self).__name__} Poisson-samples the training loader itself, with this "
                "fit's random streams and, across processes, each process's shard. Pass the plain "
                "DataLoader(dataset, batch_size=B)."
            )
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"DP training needs a torch DataLoader to Poisson-sample, got {type(dataloader).__name__}."
            )
        rank, world_size = self._shard()
        self.train_dataloader = poisson_dataloader(
            dataloader, self.max_physical_batch_size, self.secure_mode, rank=rank, world_size=world_size,
            generator=self._fit_streams(trainer).sampling,
        )
        return self.train_dataloader

    def _fit_streams(self, trainer: pl.Trainer) -> RandomStreams:
        """This fit's random streams, made when the training data is first loaded (after a
        checkpoint's step is restored) and kept for the whole fit: a tuner's reloads and trial
        loops continue them rather than start them again."""
        if self._streams is None:
            rank, _ = self._shard()
            self._streams = RandomStreams(self.seed, rank, trainer.global_step, self._fits)
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
        loader = self.train_dataloader
        draws = getattr(loader, "draws", None)
        if not draws:
            raise RuntimeError(
                f"{type(self).__name__} received a training batch that was not Poisson-sampled; the privacy "
                "guarantee would not hold. Batches must come from the training DataLoader that "
                f"{type(self).__name__}.process_dataloader prepared."
            )
        return draws.popleft()

    def _chunks_on_device(self, draw: PoissonBatch, batch: Any, dataloader_idx: int = 0) -> list[Any]:
        """The physical batches of ``draw`` on the device. A draw that fits one physical batch is
        the batch Lightning already moved (the user's transfer hooks ran on it once); the chunks of
        a larger one each go through the user's hooks as a batch of their own."""
        if not draw.split:
            return [batch] if draw.size else []
        module = self.lightning_module
        assert module is not None
        to_device = super().batch_to_device  # type: ignore[misc]
        return [to_device(module._on_before_batch_transfer(c, dataloader_idx), None, dataloader_idx) for c in draw.chunks]

    # ------------------------------------------------------------------ the step
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.budget is not None:
            # Plan here, not only in the callback's own hook: tuners (lr_find, scale_batch_size)
            # run the fit loop with the Trainer's callbacks swapped out, and their steps are private
            # steps like any other.
            self.budget.ensure_planned(self.lightning_module.trainer)
        if self.noise_multiplier is None:
            raise ValueError(
                f"{type(self).__name__}(noise_multiplier=None) asks for the noise to be calibrated, but no "
                "PrivacyBudget callback is attached. Add callbacks=[PrivacyBudget(epsilon=..., "
                "delta=...)] or set noise_multiplier."
            )
        if self.noise_multiplier == 0:
            rank_zero_warn(f"{type(self).__name__}: noise_multiplier=0 adds no noise; this run is NOT differentially private.")
        if self.budget is None:
            rank_zero_warn(
                f"{type(self).__name__} is training without a PrivacyBudget callback: the mechanism runs, but nothing "
                "tracks, logs or limits the privacy spent."
            )
        if not self.lightning_module.automatic_optimization:
            self._start_manual()
            return
        if not self.check_per_sample_grads:
            rank_zero_warn(
                f"{type(self).__name__}(check_per_sample_grads=False): per-sample gradients are not verified for this "
                "model; if they are wrong, the privacy guarantee does not hold."
            )
        self._choose_engine()

    def _start_manual(self) -> None:
        """Manual optimization: no engine; per-example gradients come from the per-example loss
        given to ``manual_backward`` (``manual.py``)."""
        trainer = self.lightning_module.trainer
        loader = self.train_dataloader
        assert loader is not None
        if not self.check_per_sample_grads:
            rank_zero_warn(
                "DPStrategy(check_per_sample_grads=False): the per-example gradients of the private loss are not "
                "checked against one backward pass per example, nor for cross-talk between examples."
            )
        if loader.collate_fn.empty is None:  # type: ignore[union-attr]
            # training_step runs on empty draws too under manual optimization: say why none can be built.
            empty_batch(loader.collate_fn.collate_fn, loader.dataset[0])  # type: ignore[union-attr]
        # The manual path checks on its first draw of two or more examples (raising on a mismatch)
        # and records it here then: until that draw, nothing is verified.
        self.grad_check = {"engine": "manual", "verified": False, "examples": 0}
        self._manual = _ManualPrivacy(self, trainer.optimizers, self.private_optimizers, self.check_per_sample_grads)

    def _choose_engine(self) -> None:
        """Attach the engine to train with: the one named, or with ``"auto"`` the first whose
        per-sample gradients pass the check on this model."""
        module = self.lightning_module
        assert module is not None
        if self.engine is not None:
            self.engine.detach()
        self.engine = None
        self.grad_check = None
        params = _trainable(module)
        examples = self._check_examples(_CHECK_EXAMPLES) if self.check_per_sample_grads else None
        reference = None
        if examples is not None:
            # The user's loss with plain autograd, once for every engine tried: a loss that is not
            # per example is refused here, whatever the engine (LossNotPerExample).
            with self._check_context(module):
                reference = self._reference(examples)
        rejected: dict[str, str] = {}
        for name in ENGINES if self.engine_name == "auto" else (self.engine_name,):
            try:
                engine = make_engine(name, self.loss_reduction)
                problems = engine.unsupported(module)
            except Exception as err:  # an engine that cannot even look at the model is passed over
                rejected[name] = f"{type(err).__name__}: {err}"
                continue
            if problems:
                rejected[name] = "; ".join(problems)
                continue
            try:
                engine.attach(module)
                verified = self._check(engine, examples, reference) if examples is not None else "NOT verified"
            except PerSampleGradientMismatch as err:
                engine.detach()
                if self.engine_name != "auto":
                    raise
                rejected[name] = str(err)
                continue
            except Exception as err:  # any failure while checking is a rejection, never a crash
                engine.detach()
                if self.engine_name != "auto":
                    raise
                rejected[name] = f"failed while checking it: {type(err).__name__}: {err}"
                continue
            self.engine = engine
            self.grad_check = {"engine": name, "verified": examples is not None, "spot_checks": 0,
                               **(self.grad_check or {})}
            self._engine_params = frozenset(params)
            passed_over = "".join(f"\n  - '{n}' passed over: {why}" for n, why in rejected.items())
            rank_zero_info(f"{type(self).__name__}: per-sample gradients by the '{name}' engine ({verified}).{passed_over}")
            if rejected and name in _SLOW_ENGINES:
                rank_zero_warn(
                    f"{type(self).__name__}: training with the slow '{name}' engine, because the faster ones cannot "
                    "compute this model's per-sample gradients exactly:"
                    + "".join(f"\n  - '{n}': {why}" for n, why in rejected.items())
                )
            return
        raise PerSampleGradientMismatch(
            "No per-sample gradient engine computes exact per-example gradients for this model:\n"
            + "\n".join(f"  - '{n}': {why}" for n, why in rejected.items())
        )

    def _check_examples(self, count: int, batch_idx: int = 0) -> Optional[_CheckExamples]:
        """Up to ``count`` real training examples for the check: one drawn at random from each of
        as many equal slices of the training set (so a class-sorted dataset shows the check
        different classes, not its first few look-alikes). ``training_step`` runs on them with
        ``batch_idx``."""
        loader = self.train_dataloader
        if loader is None:
            return None
        dataset = loader.dataset
        size = len(dataset)  # type: ignore[arg-type]
        n = min(count, size, max(self.max_physical_batch_size or count, 2))
        if self._streams is None:
            raise RuntimeError(f"{type(self).__name__}: the training data was never loaded through process_dataloader.")
        generator = self._streams.check
        bounds = [size * k // n for k in range(n + 1)]
        examples = [dataset[lo + int(torch.randint(hi - lo, (1,), generator=generator))] for lo, hi in zip(bounds, bounds[1:])]
        plain_batch_to_device = super().batch_to_device  # type: ignore[misc]

        def batch_of(positions: Any) -> Any:
            # Each example was fetched once: a Dataset with random augmentation hands the batch and
            # the one-example passes the same tensors.
            return plain_batch_to_device(collate_examples(loader, [examples[i] for i in positions]))

        # One example is enough only where training never puts two in one batch.
        least = 1 if size == 1 or self.max_physical_batch_size == 1 else 2
        return _CheckExamples(
            len(examples), batch_of, lambda b: self._run_training_step(b, batch_idx, full_precision=True), least
        )

    def _check_context(self, module: nn.Module) -> Any:
        """What every check pass runs under: training mode, no logging, metrics and buffers kept
        (a buffer that the passes change is refused), dropout off, the RNG state put back."""
        stack = ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(module)))
        stack.enter_context(_train_mode(module))
        stack.enter_context(silenced_logging(module))
        stack.enter_context(metrics_kept(module))
        stack.enter_context(_buffers_unchanged(module))
        stack.enter_context(no_dropout(module))
        return stack

    def _reference(self, examples: _CheckExamples) -> Reference:
        module = self.lightning_module
        return reference_grads(
            _trainable(module), examples.batch_of, examples.step, examples.n, self.loss_reduction,
            param_names(module), self._check_rtol(), examples.least,
        )

    def _check_rtol(self) -> float:
        """The check's relative tolerance: float32 arithmetic's, unless parameters are 16-bit."""
        module = self.lightning_module
        low = any(p.dtype in (torch.float16, torch.bfloat16) for p in _trainable(module))
        return 3e-2 if low else RTOL

    def _check(self, engine: PerSampleGradEngine, examples: _CheckExamples, reference: Reference) -> str:
        module = self.lightning_module
        assert module is not None
        start = time.perf_counter()
        with self._check_context(module):
            worst = check_per_sample_grads(
                engine, module, _trainable(module), examples.batch_of, examples.step, list(range(examples.n)),
                self.loss_reduction, reference, self._check_rtol(),
            )
        n = reference.n
        self.grad_check = {"examples": n, "worst_relative_error": float(worst), "cross_talk_checked": n >= 2,
                           "examples_skipped": reference.skipped}
        return (
            f"verified on {n} training examples drawn across the training set: per-example gradients match "
            f"one-example backward passes (largest relative error {worst:.1e}), the batch's loss is the "
            f"{self.loss_reduction} of the examples' own, and dropping an example moves no other's gradient; in "
            f"{time.perf_counter() - start:.2f} s"
        )

    def _spot_check(self, batch_idx: int) -> None:
        """At unpredictable steps (about one in ``_SPOT_CHECK_EVERY``), check again on a few fresh
        examples, at the step and ``batch_idx`` training is at: a loss that starts mixing examples
        after a warm-up, or a model that changes, is caught when it does, not never."""
        if self.engine is None or not self.check_per_sample_grads or self._streams is None:
            return
        if int(torch.randint(_SPOT_CHECK_EVERY, (1,), generator=self._streams.check)) != 0:
            return
        module = self.lightning_module
        examples = self._check_examples(_SPOT_CHECK_EXAMPLES, batch_idx)
        if examples is None:
            return
        step = module.trainer.global_step
        try:
            with self._check_context(module):
                with self.engine.disabled():
                    reference = self._reference(examples)
                check_per_sample_grads(
                    self.engine, module, _trainable(module), examples.batch_of, examples.step,
                    list(range(examples.n)), self.loss_reduction, reference, self._check_rtol(),
                )
        except PerSampleGradientMismatch as err:
            raise type(err)(
                f"At step {step} (a spot check; the start-of-fit check had passed), on fresh training examples: {err} "
                "The loss or the model changed during training (a term switched on after a warm-up, a schedule "
                "on the step or epoch); training stops here."
            ) from err
        if isinstance(self.grad_check, dict):
            self.grad_check["spot_checks"] = int(self.grad_check.get("spot_checks", 0)) + 1

    def _run_training_step(self, batch: Any, *args: Any, full_precision: bool = False, **kwargs: Any) -> tuple[Any, Tensor]:
        module = self.lightning_module
        assert module is not None
        # The check runs mixed-precision models in float32: it verifies the engine's arithmetic,
        # which does not depend on the precision, at a tolerance bf16 rounding would swamp.
        autocast = not (full_precision and isinstance(self.precision_plugin, MixedPrecision))
        with self.precision_plugin.train_step_context() if autocast else nullcontext():
            output = module.training_step(batch, *args, **kwargs)
        loss = _loss(output)
        if loss is None:
            raise RuntimeError(
                "training_step returned None on a non-empty batch. Under DP every sampled batch must "
                "produce a step: skipping one depending on the data would itself leak information."
            )
        return output, loss

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.pop("batch")
        rest = args[1:]
        draw = self._next_draw()
        #: The draw of the step being taken (its chunks and sizes), for callbacks that need them.
        self.last_draw = draw
        if self.noise_multiplier is None:
            raise RuntimeError(f"{type(self).__name__} has no noise multiplier in force; see on_train_start's error.")
        if self._pending is not None:
            raise RuntimeError("A private gradient was computed but never released by an optimizer step.")
        if self.budget is not None:
            # The rate this batch was drawn with, not a loader's: whatever loader the batch came
            # from, the budget plans and the ledger records the rate that actually trains.
            self.budget.ensure_step_allowed(self.lightning_module.trainer, draw.sample_rate)
        module = self.lightning_module
        if self._manual is not None:
            return self._manual_training_step(draw, batch, *rest, **kwargs)
        assert module is not None and self.engine is not None
        params = _trainable(module)
        if frozenset(params) != self._engine_params:
            # A callback (e.g. BaseFinetuning) froze or unfroze layers: hooks and the check were
            # made for the old set, so choose and verify the engine again for the new one.
            rank_zero_info(f"{type(self).__name__}: the trainable parameters changed; checking the engine again.")
            self._choose_engine()
        self._spot_check(rest[0] if rest and isinstance(rest[0], int) else 0)
        mechanism = self._new_mechanism(params)
        output: Any = None
        loss_sum: Optional[Tensor] = None
        with _logged_once_per_step(module) as logs:
            for chunk, size in zip(self._chunks_on_device(draw, batch), draw.sizes):
                logs.chunk_size = size
                output, loss, grads = self.engine.compute(
                    lambda b: self._run_training_step(b, *rest, **kwargs), chunk, params, size, self.loss_reduction
                )
                mechanism.add(grads)
                loss_sum = loss * size if loss_sum is None else loss_sum + loss * size
        self._mechanism = mechanism
        self._pending = draw
        if loss_sum is None:
            return self._empty_step_output()  # empty draw: no training_step, but the noise-only step still happens
        mean_loss = loss_sum / draw.size
        if isinstance(output, Mapping):  # the last chunk's extra outputs, with the batch's mean loss
            return {**output, "loss": mean_loss}
        return mean_loss

    def _manual_training_step(self, draw: PoissonBatch, batch: Any, *rest: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        manual = self._manual
        assert module is not None and manual is not None

        def run(data: Any) -> Any:
            with _logged_once_per_step(module) as logs, self.precision_plugin.train_step_context():
                logs.chunk_size = max(draw.size, 1)
                return module.training_step(data, *rest, **kwargs)

        return manual.training_step(draw, batch, run)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if not self._dp_fitting:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._manual is not None:
            plain = super().backward  # type: ignore[misc]
            self._manual.backward(closure_loss, lambda loss: plain(loss, optimizer, *args, **kwargs))
            return closure_loss
        # The per-example backward passes already ran in training_step; keep the hooks' order.
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if not self._dp_fitting:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._manual is not None and not self._manual.is_private(optimizer):
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # public: no clipping, no noise
        # The closure (training_step and backward under automatic optimization) and the DP release
        # run here, before the optimizer is called: an optimizer that ignores its closure, or
        # steps before evaluating it, then still only ever sees the released gradient.
        result = closure()
        if self._manual is not None:
            self._manual.release(optimizer)
        else:
            self._release()
        calls = 0

        def released_closure() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError(
                    f"{type(optimizer).__name__} evaluates its closure more than once per step (like LBFGS); "
                    "each evaluation would be a separate release of private data. Use a first-order "
                    "optimizer with DP training."
                )
            return result

        return super().optimizer_step(optimizer, released_closure, model, **kwargs)

    def _release(self) -> None:
        batch, mechanism = self._pending, self._mechanism
        if batch is None or mechanism is None:
            raise RuntimeError("The optimizer stepped without a private gradient from DPStrategy.training_step.")
        assert self.noise_multiplier is not None
        mechanism.release(self.noise_multiplier, batch.expected_size, add_noise=self._adds_noise,
                          all_reduce=self._all_reduce)
        self._recorded(mechanism, self.noise_multiplier, batch.sample_rate)
        self._pending = self._mechanism = None

    def _recorded(self, mechanism: GaussianMechanism, noise_multiplier: float, sample_rate: float) -> None:
        """Book one released private step: on the ledger, and with the budget, which stops the
        Trainer if the budget allows no further step."""
        self.history.record(noise_multiplier, sample_rate)
        self._count_non_finite(mechanism)
        if self.budget is not None:
            self.budget.after_step(self.lightning_module.trainer)

    def _new_mechanism(self, params: Sequence[nn.Parameter]) -> GaussianMechanism:
        assert self._streams is not None, "the training data was never loaded"
        return GaussianMechanism(params, self.max_grad_norm, self.secure_mode, self._streams)

    def _count_non_finite(self, mechanism: GaussianMechanism) -> None:
        if not mechanism.dropped:
            return
        first = self.non_finite_examples == 0
        self.non_finite_examples += mechanism.dropped
        if first:
            rank_zero_warn(
                f"{type(self).__name__}: {mechanism.dropped} training example(s) in this step had a non-finite "
                "gradient (NaN or inf in their data or loss) and contributed nothing to the update; clipping "
                "bounds every example's influence, so this costs no privacy, but check your data. The total is "
                "reported at the end of training and in the privacy report."
            )

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._dp_fitting:
            count = torch.tensor([float(self.non_finite_examples)], device=self.root_device)
            self._all_reduce([count])  # every process's examples, for the report
            self.non_finite_examples_total = int(count.item())
            if self.non_finite_examples_total:
                rank_zero_warn(
                    f"{type(self).__name__}: {self.non_finite_examples_total} training example(s) had a non-finite "
                    "gradient during this fit and contributed nothing to the updates (see the privacy report)."
                )

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        if self._dp_fitting:
            if self.engine is not None:
                self.engine.detach()
            self._dp_fitting = False
            self._pending = self._mechanism = None
            self._manual = None
            self._streams = None
            loop = getattr(self, "_marked_loop", None)
            if loop is not None and "setup_data" in vars(loop):
                del loop.setup_data  # back to the class's method
            self._marked_loop = None
            _remove_warning_filter(_EMPTY_STEP_WARNING)
        super().teardown()


class DPStrategy(_PrivateTraining, SingleDeviceStrategy):
    r"""Differentially private training (DP-SGD) on one device.

    Every training batch is a Poisson sample of the training set; each example's gradient
    is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise with
    standard deviation ``noise_multiplier * max_grad_norm`` is added once, and the result
    divided by the expected batch size is what the user's optimizer sees. Pair it with the
    :class:`~lightning_dp.PrivacyBudget` callback to calibrate the noise, track epsilon and
    stop on the budget.

    Args:
        max_grad_norm: clipping norm ``C`` for each example's gradient (> 0).
        noise_multiplier: ``sigma``, the noise standard deviation in units of ``C`` (>= 0).
            ``None`` lets :class:`~lightning_dp.PrivacyBudget` calibrate it to the target.
        max_physical_batch_size: process each Poisson batch in chunks of at most this many
            examples (bounded memory); a batch still gives exactly one noisy update.
            ``None``: no split.
        secure_mode: seed the noise and the Poisson draws from OS entropy at every step and
            sum four Gaussian draws per noise value (Holohan et al. 2021). This protects
            against an attacker who knows or can set the training seed (``seed_everything``
            then no longer reproduces the noise) and against reading single draws' low-order
            bits. It does *not* make torch's generators cryptographically secure, nor remove
            timing side channels.
        loss_reduction: how ``training_step``'s loss reduces over the batch: ``"mean"``
            (default) or ``"sum"``. The start-of-fit check tells you if it is the other.
        engine: the per-sample gradient engine: ``"auto"`` (default) takes the first of
            ``"ghost"`` (book-keeping ghost clipping: no per-example gradients for Linear,
            Embedding and Conv2d layers, least memory), ``"hooks"`` (Opacus's per-layer hooks),
            ``"functorch"`` (``vmap(grad(...))``
            over the whole ``training_step``: exact for causal attention, recurrent layers,
            position embeddings, tied weights) and ``"loop"`` (a backward pass per example:
            exact for anything, slowest) that passes the start-of-fit check, and logs its
            choice; naming one forces it.
        check_per_sample_grads: before the first step, compare the engine's per-sample
            gradients with one-example backward passes on a few training examples, and refuse
            to train on mismatch. Turn off only after verifying the gradients yourself.
        replace_batch_norm: replace BatchNorm layers by GroupNorm in the model the Trainer
            trains (otherwise they are refused).
        private_optimizers: with manual optimization (``automatic_optimization = False``), the
            indices (in ``configure_optimizers`` order) of the optimizers whose parameters
            train on the private data; ``None`` (default): all. Each training step must pass
            its private loss *per example*, shape ``(batch size,)``, to ``manual_backward`` and
            step one private optimizer once; the others (e.g. a GAN's generator, which sees
            only the discriminator) step on scalar losses that must not read the batch,
            without clipping, noise or accounting. See :mod:`lightning_dp.manual`.
        seed: ``None`` (default): the noise, the Poisson draws and the check's examples come
            from streams seeded with OS entropy at every fit, on every process, so no run, resume,
            tuner trial or process replays another's (``seed_everything`` does not reach them). An
            int makes them reproducible for debugging (derived from the seed, the rank, the step
            the fit starts from and the fit's index, so a resume still draws new noise), with a
            warning: anyone who knows the seed can recompute the noise.
        device: the device to train on; by default the one the Trainer's accelerator picks.

    Example::

        >>> import lightning as L
        >>> from lightning_dp import DPStrategy, PrivacyBudget
        >>> trainer = L.Trainer(
        ...     max_epochs=10,
        ...     strategy=DPStrategy(max_grad_norm=1.0),
        ...     callbacks=[PrivacyBudget(epsilon=3.0, delta=1e-5)],
        ...     logger=False,
        ... )
        >>> type(L.Trainer(strategy="dp", logger=False).strategy).__name__  # by name, once imported
        'DPStrategy'
        >>> gan = DPStrategy(max_grad_norm=1.0, private_optimizers=[1])  # manual: only optimizer 1 reads data
        >>> gan.private_optimizers
        [1]

    Then ``trainer.fit(model, datamodule=dm)`` with an unchanged LightningModule.
    """

    strategy_name = "dp"

    def __init__(
        self,
        max_grad_norm: float = 1.0,
        noise_multiplier: Optional[float] = None,
        max_physical_batch_size: Optional[int] = None,
        secure_mode: bool = False,
        loss_reduction: LossReduction = "mean",
        engine: Literal["auto", "ghost", "hooks", "functorch", "loop"] = "auto",
        check_per_sample_grads: bool = True,
        replace_batch_norm: bool = False,
        private_optimizers: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        # Lightning's accelerator connector fills ``parallel_devices`` from Trainer(devices=...)
        # when the strategy leaves it empty: that is how an unpinned DPStrategy lands on the GPU.
        self.parallel_devices: Optional[list[torch.device]] = [torch.device(device)] if device is not None else None
        self._init_private(
            max_grad_norm, noise_multiplier, max_physical_batch_size, secure_mode, loss_reduction, engine,
            check_per_sample_grads, replace_batch_norm, private_optimizers, seed,
        )

    # ------------------------------------------------------------------ devices
    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return self.parallel_devices[0]
        return self._root_device

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"DPStrategy trains on one device but the Trainer was given {len(self.parallel_devices)}. "
                "Use Trainer(devices=1), or DPDDPStrategy for several."
            )
        super().setup(trainer)

def _trainable(module: nn.Module) -> list[nn.Parameter]:
    # Recomputed every step: a parameter unfrozen by a callback must be clipped and noised too.
    return [p for p in module.parameters() if p.requires_grad]


def _loss(output: Any) -> Optional[Tensor]:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise TypeError(f"training_step must return a loss tensor, a dict with 'loss', or None; got {type(output).__name__}")


class _StepLogs:
    """``self.log`` calls made while a Poisson batch runs chunk by chunk, replayed once for
    the whole batch: each value as the mean over chunks weighted by their example counts."""

    def __init__(self) -> None:
        self.chunk_size = 0
        self.calls: dict[str, list[tuple[Any, float, dict[str, Any]]]] = {}

    def record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError("DPStrategy: pass self.log options by keyword (prog_bar=..., on_step=...)")
        weight = kwargs.pop("batch_size", None) or self.chunk_size
        self.calls.setdefault(name, []).append((value, float(weight), kwargs))

    def replay(self, module: pl.LightningModule) -> None:
        for name, calls in self.calls.items():
            value, _, kwargs = calls[-1]
            total = sum(w for _, w, _ in calls)
            if len(calls) > 1 and all(isinstance(v, (Tensor, int, float)) for v, _, _ in calls):
                value = sum(torch.as_tensor(v, dtype=torch.float32).detach() * (w / total) for v, w, _ in calls)
            module.log(name, value, batch_size=int(total), **kwargs)


@contextmanager
def _logged_once_per_step(module: pl.LightningModule) -> Iterator[_StepLogs]:
    logs = _StepLogs()
    module.log = logs.record  # type: ignore[method-assign]  # log_dict calls self.log too
    try:
        yield logs
    finally:
        del module.log
    logs.replay(module)


@contextmanager
def _train_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _remove_warning_filter(pattern: str) -> None:
    for entry in list(warnings.filters):
        if entry[0] == "ignore" and entry[1] is not None and entry[1].pattern == pattern:
            warnings.filters.remove(entry)
            warnings._filters_mutated()  # type: ignore[attr-defined]  # as filterwarnings() does
            break


StrategyRegistry.register(
    "dp", DPStrategy, description="Differentially private training (DP-SGD) on one device", override=True
)
