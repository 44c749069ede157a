"""A differentially private conditional GAN on scikit-learn's digits, with manual optimization.

The discriminator reads the private training digits, so its optimizer is *private*: each of its
steps clips each example's gradient, adds noise and is accounted. The generator never sees the
data, only the discriminator, so its steps are post-processing: its optimizer is *public*
(``DPStrategy(private_optimizers=[1])``) and spends nothing. Three rules make that true:

* the discriminator's loss reaches ``manual_backward`` per example (``reduction="none"``),
  entry ``i`` pairing real digit ``i`` with a fake one (Opacus's DP-GAN pairing);
* the generator's loss is a scalar over a *fixed* number of fakes (the expected batch size,
  never the batch's real size, which is private), with labels drawn uniformly (public);
* one discriminator step per Poisson batch (DPStrategy refuses a second).

Then the generated digits are the DP output. Their utility: a classifier trained only on
generated digits, scored on real held-out digits (torchmetrics), next to chance and to the
same classifier trained on the real training digits (not private: the ceiling).

    python examples/dp_gan.py              # about 30 s on 2 idle CPU cores
    python examples/dp_gan.py --fast       # a few epochs, for smoke tests
    python examples/dp_gan.py --out gan/   # where the two PNG figures and the privacy report go

``main(argv)`` returns the figures it prints, so a test can call it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from lightning_dp import DPStrategy, PrivacyBudget  # noqa: E402

N_TRAIN, CLASSES, Z = 1400, 10, 32


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Train (private) and held-out (for scoring) splits, pixels in [-1, 1]."""
    x, y = load_digits(return_X_y=True)
    # Scale by the *public* pixel range 0..16, never by statistics of the private data.
    x = torch.tensor(x, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:N_TRAIN], perm[N_TRAIN:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class ConditionalGAN(L.LightningModule):
    """A small MLP conditional GAN (no BatchNorm: it mixes the examples of a batch)."""

    def __init__(self, batch_size: int = 64, lr: float = 2e-3, hidden: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(
            nn.Linear(Z + CLASSES, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 64), nn.Tanh()
        )
        self.discriminator = nn.Sequential(nn.Linear(64 + CLASSES, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def generate(self, labels: torch.Tensor) -> torch.Tensor:
        z = torch.randn(len(labels), Z, device=self.device)
        return self.generator(torch.cat([z, nn.functional.one_hot(labels, CLASSES).float()], 1))

    def score(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.discriminator(torch.cat([x, nn.functional.one_hot(labels, CLASSES).float()], 1)).squeeze(1)

    def random_labels(self, n: int) -> torch.Tensor:
        return torch.randint(0, CLASSES, (n,), device=self.device)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits

        # Discriminator (private): entry i = real digit i scored real + a fake scored fake.
        fake_labels = self.random_labels(len(x))
        fake = self.generate(fake_labels).detach()
        d_loss = bce(self.score(x, y), torch.ones(len(x), device=self.device), reduction="none") + bce(
            self.score(fake, fake_labels), torch.zeros(len(x), device=self.device), reduction="none"
        )
        self.manual_backward(d_loss)  # shape (batch,): clipped per example, noised once at the step
        opt_d.step()
        opt_d.zero_grad()

        # Generator (public): a fixed number of fakes, so nothing here depends on the batch.
        labels = self.random_labels(self.hparams.batch_size)
        g_loss = bce(self.score(self.generate(labels), labels), torch.ones(len(labels), device=self.device))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        # Losses of the private batch are not themselves private: log them for debugging only.
        self.log_dict({"d_loss": d_loss.sum() / self.hparams.batch_size, "g_loss": g_loss})

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas),  # 0: public
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas),  # 1: private
        ]


def utility(train_x: torch.Tensor, train_y: torch.Tensor, test: TensorDataset) -> float:
    """Accuracy on the real held-out digits of a nearest-class-mean classifier fitted on
    (train_x, train_y): cheap, and it scores how well each class's digits look like the class."""
    means = torch.stack([train_x[train_y == k].mean(0) for k in range(CLASSES)])
    x, y = test.tensors
    scores = -torch.cdist(x, means)  # the nearest mean wins
    return float(MulticlassAccuracy(num_classes=CLASSES, average="micro")(scores, y))


def save_grid(samples: torch.Tensor, path: str) -> None:
    fig, axes = plt.subplots(CLASSES, samples.shape[1], figsize=(samples.shape[1] * 0.6, CLASSES * 0.6))
    for digit in range(CLASSES):
        for j in range(samples.shape[1]):
            ax = axes[digit, j]
            ax.imshow(samples[digit, j].reshape(8, 8).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.axis("off")
    fig.suptitle("DP-GAN: generated digits, one row per class")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_utility(scores: dict[str, float], epsilon: float, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(list(scores), list(scores.values()), color=["#999999", "#4c72b0", "#55a868"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on real held-out digits")
    ax.set_title(f"Classifier trained on ... (DP-GAN at epsilon={epsilon:.2f})")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=5.0, help="privacy budget epsilon (default 5)")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta (default 1e-5, well below 1/N)")
    parser.add_argument("--epochs", type=int, default=60, help="planned epochs; the noise is calibrated to them")
    parser.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size (default 64)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the weights and the noise")
    parser.add_argument("--fast", action="store_true", help="train 3 epochs only, for smoke tests")
    parser.add_argument("--out", default="dp_gan_out", help="directory for the PNG figures (default dp_gan_out/)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    epochs = 3 if args.fast else args.epochs
    L.seed_everything(args.seed, verbose=False)
    os.makedirs(args.out, exist_ok=True)
    train, test = digits(args.seed)

    budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        # Optimizer 1 (the discriminator) is private; optimizer 0 (the generator) is public.
        strategy=DPStrategy(max_grad_norm=args.max_grad_norm, private_optimizers=[1]),
        callbacks=[budget],
        logger=False,
        default_root_dir=args.out,  # the privacy report goes next to the figures
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = ConditionalGAN(batch_size=args.batch_size)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))

    # Everything below uses only the generator (DP by post-processing) and, for the scores and
    # the "real data" reference, data the generator never trained on or outside the budget.
    model.eval()
    with torch.no_grad():
        grid = model.generate(torch.arange(CLASSES).repeat_interleave(10)).reshape(CLASSES, 10, 64)
        labels = torch.arange(CLASSES).repeat_interleave(200)
        synthetic = model.generate(labels)
    scores = {
        "chance": 1.0 / CLASSES,
        "generated digits": utility(synthetic, labels, test),
        "real digits (not private)": utility(*train.tensors, test),
    }
    grid_png = os.path.join(args.out, "generated_digits.png")
    utility_png = os.path.join(args.out, "utility.png")
    save_grid(grid, grid_png)
    save_utility(scores, budget.epsilon_spent, utility_png)

    result = {
        "epsilon": budget.epsilon_spent,
        "delta": budget.delta,
        "steps": budget.steps,  # private (discriminator) steps; the generator's are not accounted
        "optimizer_steps": trainer.global_step,  # both optimizers' steps, as Lightning counts them
        "noise_multiplier": budget.noise_multiplier,
        "acc_generated": scores["generated digits"],
        "acc_real": scores["real digits (not private)"],
        "acc_chance": scores["chance"],
        "grid_png": grid_png,
        "utility_png": utility_png,
        "stopped_reason": budget.stopped_reason,
    }
    print()
    print("=" * 72)
    print(f"epsilon spent:          {result['epsilon']:.3f} (budget {args.epsilon:g}, delta {args.delta:g})")
    print(f"private steps:          {result['steps']} discriminator steps ({result['optimizer_steps']} optimizer "
          "steps in all)")
    print(f"noise multiplier:       {result['noise_multiplier']:.3f} (clipping norm {args.max_grad_norm:g})")
    print("accuracy on real held-out digits of a classifier trained on")
    print(f"  generated digits:     {result['acc_generated']:.3f}")
    print(f"  real digits:          {result['acc_real']:.3f} (not private: the ceiling)")
    print(f"  chance:               {result['acc_chance']:.3f}")
    print(f"figures:                {grid_png}, {utility_png}")
    print("=" * 72)
    return result


if __name__ == "__main__":
    main()
