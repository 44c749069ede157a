"""``DPDDPStrategy``: DP-SGD across processes on Lightning's DDP.

The privacy analysis is of one global mechanism, so each part is global:

* **Sampling.** With ``W`` processes of per-process batch size ``b`` over ``N`` examples, the
  rate is ``q = W*b/N``; process ``r`` Poisson-samples the disjoint shard ``r, r+W, ...`` at
  ``q`` with its own random stream, so the union is a Poisson sample of the whole dataset.
  Lightning's injected ``DistributedSampler`` is replaced. Every process takes the same number
  of steps per epoch, also when its draw is empty (it still joins the all-reduce).
* **Gradients.** Each process clips its own examples' gradients; the clipped sums are
  all-reduced; rank 0 alone adds the noise before the reduction, so it enters exactly once;
  the result is divided by the global expected batch size ``q*N``. Every process ends the
  step with the same gradient. DDP's own gradient reduction never runs: the per-example
  passes call the LightningModule directly, not the DDP wrapper.
* **Accounting.** The ledger is identical on every process (same ``q``, same noise, same
  steps); ``PrivacyBudget`` plans on rank 0 and broadcasts, so all processes stop together.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor

from lightning_dp.lightning.config import PrivacyConfig, clipping_config
from lightning_dp.lightning.routing import RoutesPrivateStep
from lightning_dp.mechanism.grads.engine import LossReduction

__all__ = ["DPDDPStrategy"]


class DPDDPStrategy(RoutesPrivateStep, DDPStrategy):
    r"""Differentially private training (DP-SGD) over many processes, on one node or many.

    Takes the arguments of :class:`~lightning_dp.DPStrategy` (``max_grad_norm``,
    ``noise_multiplier``, ``max_physical_batch_size``, ``secure_mode``, ``loss_reduction``,
    ``engine``, ``check_per_sample_grads``, ``replace_batch_norm``, ``seed``) and passes any other
    keyword argument to Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy`
    (``process_group_backend``, ``timeout``, ``start_method``, ...). The DataLoader's
    ``batch_size`` is per process: the expected global batch is ``batch_size * world_size``.

    Example::

        >>> import lightning as L
        >>> from lightning_dp import DPDDPStrategy, PrivacyBudget
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DPDDPStrategy(max_grad_norm=1.0),
        ...                     callbacks=[PrivacyBudget(epsilon=3.0, delta=1e-5)], logger=False)
        >>> trainer.world_size
        2

    Also available as ``Trainer(strategy="dp_ddp")`` once ``lightning_dp`` is imported.
    """

    strategy_name = "dp_ddp"

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
        seed: Optional[int] = None,
        clipping: Literal["flat", "adaptive"] = "flat",
        target_quantile: float = 0.5,
        clipping_learning_rate: float = 0.2,
        count_noise: Optional[float] = None,
        privacy_unit: Literal["example", "user"] = "example",
        user_ids: Optional[Any] = None,
        max_examples_per_user: Optional[int] = None,
        **ddp_kwargs: Any,
    ) -> None:
        config = PrivacyConfig(max_grad_norm, noise_multiplier, max_physical_batch_size, secure_mode, loss_reduction,
                               engine, check_per_sample_grads, replace_batch_norm, seed=seed,
                               adaptive_clipping=clipping_config(clipping, target_quantile, clipping_learning_rate,
                                                                 count_noise),
                               privacy_unit=privacy_unit, user_ids=user_ids,
                               max_examples_per_user=max_examples_per_user)
        super().__init__(**ddp_kwargs)
        self._own_private_step(config)

    # ------------------------------------------------------------------ many processes (DPHost)
    def dp_shard(self) -> tuple[int, int]:
        return self.global_rank, self.world_size

    def dp_all_reduce(self, tensors: list[Tensor]) -> None:
        if self.world_size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    @property
    def dp_adds_noise(self) -> bool:
        return self.global_rank == 0

    def dp_empty_step_output(self) -> Any:
        # Lightning refuses a None step output under DDP; a constant zero loss takes no part
        # in any gradient (the strategy's backward does not backpropagate it).
        return torch.zeros((), device=self.root_device)

    @property
    def dp_supports_manual(self) -> bool:
        return False


StrategyRegistry.register(
    "dp_ddp", DPDDPStrategy, description="Differentially private training (DP-SGD) over DDP processes", override=True
)
