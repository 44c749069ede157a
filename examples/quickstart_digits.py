"""Quickstart: a digits classifier trained under a differential privacy budget.

An ordinary LightningModule and DataModule; the two things that make the run private are the
``strategy=DPStrategy(...)`` and ``callbacks=[PrivacyBudget(...)]`` arguments of the Trainer.
The noise is calibrated so that the planned epochs spend (almost exactly) the budget, and the
run stops before any step that would spend more. Data: scikit-learn's bundled ``load_digits``
(1,797 8x8 images; nothing is downloaded). Logs go to TensorBoard under ``runs/``.

    python examples/quickstart_digits.py                # about 20 s on 2 CPU cores
    python examples/quickstart_digits.py --epsilon 1.0  # a tighter budget: more noise
    python examples/quickstart_digits.py --fast         # 3 epochs, for smoke tests
    tensorboard --logdir runs                           # dp/epsilon, train_loss, val_acc

``main(argv)`` returns the figures it prints, so a test can call it.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPStrategy, PrivacyBudget

N_TRAIN = 1400  # the remaining 397 images are the validation split


class Digits(L.LightningDataModule):
    """scikit-learn's 8x8 digits, split into train/val with a fixed seed."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y)
        # Scale by the *public* pixel range (0..16) to [-0.5, 0.5] rather than standardising with
        # the data's own statistics: a scaler fitted on the training set would publish its
        # per-pixel means and deviations outside the privacy budget; the known range needs no data.
        x = x / 16.0 - 0.5
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = perm[:N_TRAIN], perm[N_TRAIN:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        # An ordinary loader: DPStrategy replaces its batching by Poisson sampling with the same
        # expected batch size (each example joins each batch with probability batch_size / N).
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # Validation, test and predict loaders are left exactly as they are.
        return DataLoader(self.val_set, batch_size=256, num_workers=0)


class MLP(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about privacy.

    No BatchNorm: it mixes examples within a batch, which per-example clipping cannot allow
    (DPStrategy refuses it, or swaps it for GroupNorm with ``replace_batch_norm=True``).
    """

    def __init__(self, hidden: int = 128, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)  # a mean over the batch, as usual
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self.net(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The optimizer sees the clipped, noised, averaged gradient; it needs nothing special.
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget epsilon (default 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta (default 1e-5, well below 1/N)")
    parser.add_argument("--epochs", type=int, default=15, help="planned epochs; the noise is calibrated to them (default 15)")
    parser.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size (default 64)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the weights and the noise (default 0)")
    parser.add_argument("--fast", action="store_true", help="train 3 epochs only, for smoke tests")
    parser.add_argument("--out", default="runs", help="TensorBoard log directory (default runs/)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    epochs = 3 if args.fast else args.epochs
    L.seed_everything(args.seed, verbose=False)

    # The budget: PrivacyBudget picks the smallest noise multiplier whose epsilon after the
    # planned steps (epochs x batches per epoch) stays within epsilon, logs dp/epsilon as it
    # goes, and stops the Trainer before a step that would exceed it.
    budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    logger = TensorBoardLogger(args.out, name="quickstart")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        # noise_multiplier is left to None: the budget calibrates it at the start of fit.
        strategy=DPStrategy(max_grad_norm=args.max_grad_norm),
        callbacks=[budget],
        logger=logger,
        log_every_n_steps=10,  # each log computes epsilon (~0.1 s): often enough for a smooth curve
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = MLP()
    trainer.fit(model, datamodule=Digits(batch_size=args.batch_size, seed=args.seed))

    result = {
        "epsilon": budget.epsilon_spent,  # what the steps taken spent, at delta
        "delta": budget.delta,
        "steps": budget.steps,  # private (noised) optimizer steps
        "noise_multiplier": budget.noise_multiplier,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "log_dir": logger.log_dir,
        # Set when the budget ended training; None if the planned epochs ended first.
        "stopped_reason": budget.stopped_reason,
    }
    print()
    print("=" * 72)
    print(f"epsilon spent:        {result['epsilon']:.3f} (budget {args.epsilon:g}, {budget.accountant} accountant)")
    print(f"delta:                {result['delta']:g}")
    print(f"private steps:        {result['steps']} (sample rate {trainer.strategy.sample_rate:.4f})")
    print(f"noise multiplier:     {result['noise_multiplier']:.3f} (clipping norm {args.max_grad_norm:g})")
    print(f"validation accuracy:  {result['val_acc']:.3f}")
    print(f"TensorBoard logs:     {result['log_dir']}  (tensorboard --logdir {args.out})")
    print(f"why training stopped: {result['stopped_reason'] or f'the planned {epochs} epochs ended'}")
    print("=" * 72)
    return result


if __name__ == "__main__":
    main()
