"""Quickstart: a digits classifier trained under a differential privacy budget.

An ordinary LightningModule and DataModule; the two lines that make it private are the
``strategy=DPStrategy(...)`` and ``callbacks=[PrivacyBudget(...)]`` arguments of the Trainer.
The noise is calibrated so that the planned epochs spend exactly the budget, and the run
stops before any step that would spend more. Data: scikit-learn's bundled ``load_digits``
(1,797 8x8 images; nothing is downloaded). Logs go to TensorBoard under ``runs/``.

    python examples/quickstart_digits.py                # about half a minute on 2 CPU cores
    python examples/quickstart_digits.py --epsilon 1.0  # a tighter budget, more noise
    tensorboard --logdir runs                           # dp/epsilon, val_acc, ...
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


class Digits(L.LightningDataModule):
    """scikit-learn's digits, standardised with statistics of the training split only."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = perm[:1400], perm[1400:]
        # Standardising with the training set's own statistics is a (tiny) non-private release;
        # the pixel range is public (0..16), so we scale by it instead.
        x = x / 16.0 - 0.5
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class MLP(L.LightningModule):
    """An unchanged, ordinary LightningModule: nothing in it knows about privacy."""

    def __init__(self, hidden: int = 128, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self.net(x).argmax(dim=1), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget epsilon (default 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta (default 1e-5)")
    parser.add_argument("--epochs", type=int, default=15, help="planned epochs; the noise is calibrated to them")
    parser.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--fast", action="store_true", help="3 epochs, for smoke tests")
    parser.add_argument("--out", default="runs", help="TensorBoard log directory (default runs/)")
    args = parser.parse_args(argv)
    epochs = 3 if args.fast else args.epochs

    L.seed_everything(0, verbose=False)
    budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    logger = TensorBoardLogger(args.out, name="quickstart")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        strategy=DPStrategy(max_grad_norm=args.max_grad_norm),  # noise_multiplier=None: calibrated
        callbacks=[budget],
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = MLP()
    data = Digits(batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)

    result = {
        "epsilon": budget.epsilon_spent,
        "delta": budget.delta,
        "steps": budget.steps,
        "noise_multiplier": budget.noise_multiplier,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "log_dir": logger.log_dir,
        "stopped_reason": budget.stopped_reason,
    }
    print()
    print(f"privacy spent: epsilon = {result['epsilon']:.3f} of {args.epsilon:g} at delta = {args.delta:g} "
          f"({budget.accountant} accountant)")
    print(f"private steps: {result['steps']} at noise multiplier {result['noise_multiplier']:.3f}, "
          f"sample rate {trainer.strategy.sample_rate:.4f}")
    print(f"validation accuracy: {result['val_acc']:.3f}")
    print(f"why training stopped: {result['stopped_reason'] or 'the planned epochs ended'}")
    print(f"TensorBoard logs: {result['log_dir']}  (tensorboard --logdir {args.out})")
    return result


if __name__ == "__main__":
    main()
