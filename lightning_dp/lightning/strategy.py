"""``DPStrategy``: DP-SGD on one device, as a Lightning strategy.

The strategy is Lightning's :class:`~lightning.pytorch.strategies.SingleDeviceStrategy` plus one
:class:`~lightning_dp.lightning.private_step.PrivateStep`, which does the private part of every
hook (``routing.py`` routes them): Poisson sampling of the training loader, per-example
gradients, clipping, noise, and recording the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from lightning_dp.lightning.config import PrivacyConfig, clipping_config
from lightning_dp.lightning.routing import RoutesPrivateStep
from lightning_dp.mechanism.grads.engine import LossReduction

__all__ = ["DPStrategy"]


class DPStrategy(RoutesPrivateStep, SingleDeviceStrategy):
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
            without clipping, noise or accounting. See :mod:`lightning_dp.lightning.manual`.
        seed: ``None`` (default): the noise, the Poisson draws and the check's examples come
            from streams seeded with OS entropy at every fit, on every process, so no run, resume,
            tuner trial or process replays another's (``seed_everything`` does not reach them). An
            int makes them reproducible for debugging (derived from the seed, the rank, the step
            the fit starts from and the fit's index, so a resume still draws new noise), with a
            warning: anyone who knows the seed can recompute the noise.
        clipping: ``"flat"`` (default): every example is clipped to ``max_grad_norm``.
            ``"adaptive"``: ``max_grad_norm`` is the starting norm, and each step moves it towards
            the ``target_quantile`` of the per-example gradient norms, estimated from a noised count
            of unclipped examples (Andrew et al. 2021; see
            :mod:`lightning_dp.mechanism.adaptive_clipping`). The count's noise is part of the
            mechanism: ``noise_multiplier`` stays the one the accountant composes, and the gradient
            gets slightly more. Logged as ``dp/max_grad_norm``; kept in checkpoints.
        target_quantile: adaptive clipping's target fraction of unclipped examples (0.5).
        clipping_learning_rate: adaptive clipping's geometric learning rate (0.2).
        count_noise: adaptive clipping's noise on the count; ``None``: ``B/20`` for an expected
            batch size ``B``, at least the noise multiplier.
        privacy_unit: ``"example"`` (default) or ``"user"``: protect people, not rows. Users join
            each batch independently (the DataLoader's ``batch_size`` is then the expected number
            of users per batch), a sampled user contributes at most ``max_examples_per_user``
            examples (a fresh random subset when they have more), and the gradient of the sum of
            their examples' losses is clipped as one; every figure is then user-level. See
            :mod:`lightning_dp.mechanism.user_sampling`.
        user_ids: with ``privacy_unit="user"``, each training example's user: a sequence (one
            hashable per index), or a callable on the training dataset (for DataModules);
            ``None``: the dataset's ``user_ids`` attribute.
        max_examples_per_user: with ``privacy_unit="user"``, the public cap ``k`` (required).
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
        clipping: Literal["flat", "adaptive"] = "flat",
        target_quantile: float = 0.5,
        clipping_learning_rate: float = 0.2,
        count_noise: Optional[float] = None,
        privacy_unit: Literal["example", "user"] = "example",
        user_ids: Optional[Any] = None,
        max_examples_per_user: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        config = PrivacyConfig(
            max_grad_norm, noise_multiplier, max_physical_batch_size, secure_mode, loss_reduction, engine,
            check_per_sample_grads, replace_batch_norm,
            None if private_optimizers is None else tuple(private_optimizers), seed,  # type: ignore[arg-type]
            clipping_config(clipping, target_quantile, clipping_learning_rate, count_noise),
            privacy_unit, user_ids, max_examples_per_user,
        )
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        # Lightning's accelerator connector fills ``parallel_devices`` from Trainer(devices=...)
        # when the strategy leaves it empty: that is how an unpinned DPStrategy lands on the GPU.
        self.parallel_devices: Optional[list[torch.device]] = [torch.device(device)] if device is not None else None
        self._own_private_step(config)

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

    # ------------------------------------------------------------------ one process (DPHost)
    def dp_shard(self) -> tuple[int, int]:
        return 0, 1

    def dp_all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """One process: nothing to sum over."""

    @property
    def dp_adds_noise(self) -> bool:
        return True

    def dp_empty_step_output(self) -> Any:
        return None

    @property
    def dp_supports_manual(self) -> bool:
        return True


StrategyRegistry.register(
    "dp", DPStrategy, description="Differentially private training (DP-SGD) on one device", override=True
)
