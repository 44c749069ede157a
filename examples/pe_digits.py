"""DP synthetic digits without training on them: Private Evolution over a public stroke simulator.

The private set is scikit-learn's digits (the same 1,400 training digits as ``quickstart_digits.py``
and ``dp_gan.py``; the other 397 are the held-out evaluation set, which this example treats as
public). The public generator is ``digit_simulator.py``: hand-drawn stroke skeletons rendered the
way the digits were made (32x32 bitmap, 4x4 block counts), which never sees a private digit. Private
Evolution moves the simulator's parameters towards the private digits using only noisy
nearest-neighbour votes (raw pixels, L2); the result is a synthetic training set anyone may use.

Each epsilon is compared with, on the same held-out digits:
* the same MLP as the quickstart trained (non-privately, with a plain Lightning Trainer) on the
  synthetic digits, against the simulator alone (epsilon 0) and DP-SGD on the real digits at the
  same (epsilon, delta) (``quickstart_digits.py``);
* a nearest-class-mean classifier, the score ``dp_gan.py`` reports, against the DP-GAN at the same
  (epsilon, delta) (full mode, or ``--gan``).

    python examples/pe_digits.py --fast      # epsilon 4 only, about 20 s on 2 CPU cores
    python examples/pe_digits.py             # epsilon 1, 4 and infinity, with the DP-GAN: a few minutes
    python examples/pe_digits.py --out pe/   # where the figures go

``main(argv)`` returns the figures it prints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

import quickstart_digits as quickstart  # noqa: E402  (its MLP and its split)
from digit_simulator import DigitSimulator  # noqa: E402
from lightning_dp import PrivateEvolution  # noqa: E402
from lightning_dp.core.gaussian_dp import calibrate_noise_multiplier  # noqa: E402
from lightning_dp.report import PrivacyRecord, build_report, print_report  # noqa: E402

CLASSES = 10
# Settings per epsilon (from a sweep on a public simulator, see examples/RESULTS.md): at small
# epsilon fewer iterations and a smaller population keep the votes above the noise.
SETTINGS = {
    1.0: dict(iterations=5, population=50, threshold_sigmas=1.0),
    4.0: dict(iterations=10, population=100, threshold_sigmas=2.0),
    math.inf: dict(iterations=10, population=300, threshold_sigmas=0.0),
}
FAST = dict(iterations=5, population=50, threshold_sigmas=1.0)


def split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quickstart's split: pixels 0..16, the first 1,400 of a seeded permutation private."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[: quickstart.N_TRAIN], perm[quickstart.N_TRAIN:]
    return x[train], y[train], x[test], y[test]


def mlp_accuracy(datamodule: L.LightningDataModule, test_x: torch.Tensor, test_y: torch.Tensor, epochs: int,
                 seed: int) -> float:
    """The quickstart's MLP trained on ``datamodule`` (pixels 0..16), scored on the test digits."""
    L.seed_everything(seed, verbose=False)
    model = quickstart.MLP()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    with torch.no_grad():
        scores = model.net(test_x / 16.0 - 0.5)
    return float(MulticlassAccuracy(num_classes=CLASSES, average="micro")(scores, test_y))


def nearest_mean_accuracy(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """``dp_gan.py``'s score: a nearest-class-mean classifier fitted on (x, y)."""
    means = torch.stack([x[y == k].mean(0) for k in range(CLASSES)])
    return float(MulticlassAccuracy(num_classes=CLASSES, average="micro")(-torch.cdist(test_x, means), test_y))


def synthesize(private_x: torch.Tensor, private_y: torch.Tensor, epsilon: float, settings: dict[str, Any],
               final_per_class: int, delta: float, seed: int, test: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """One Private Evolution job; returns the result and the rendered population of each iteration."""
    sim = DigitSimulator(seed=seed + 1)
    iterations = settings["iterations"]
    sigma = 0.0 if math.isinf(epsilon) else calibrate_noise_multiplier(epsilon, delta, iterations)
    frames: list[torch.Tensor] = [sim.render(torch.cat([sim.random(c, 6) for c in range(CLASSES)]))]

    def metric(samples: torch.Tensor, labels: torch.Tensor) -> float:
        # Post-processing of the population, scored on the public held-out digits (never the private ones).
        images = sim.render(samples)
        frames.append(torch.cat([images[labels == c][:6] for c in range(CLASSES)]))
        return nearest_mean_accuracy(images, labels, *test)

    pe = PrivateEvolution(
        random_api=sim.random, variation_api=sim.vary, embed=sim.render, private_embed=lambda x: x,
        num_samples=settings["population"] * CLASSES, iterations=iterations,
        **(dict(noise_multiplier=1e-9) if math.isinf(epsilon) else dict(epsilon=epsilon)), delta=delta,
        threshold=settings["threshold_sigmas"] * sigma, classes=list(range(CLASSES)),
        final_samples=final_per_class * CLASSES, metric=metric, generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    return pe.fit(private_x, private_y), sim, frames


def save_frames(frames: list[torch.Tensor], path: str, title: str) -> None:
    """One row of digits per iteration (6 per class), row 0 the public simulator's."""
    gap = torch.full((2, frames[0].shape[0] * 9), float("nan"))
    rows = []
    for images in frames:
        tiles = torch.nn.functional.pad(images.reshape(-1, 8, 8), (0, 1), value=float("nan"))
        rows += [tiles.permute(1, 0, 2).reshape(8, -1), gap]
    canvas = torch.cat(rows[:-1])
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 40, canvas.shape[0] / 40 + 0.6))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([4 + 10 * t for t in range(len(frames))], [str(t) for t in range(len(frames))])
    ax.set_ylabel("iteration")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="epsilon 4 only, small settings, for smoke tests")
    parser.add_argument("--epsilons", type=float, nargs="+", default=None, help="default: 1 4 inf (fast: 4)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--final-per-class", type=int, default=None, help="synthetic digits per class (300; fast 100)")
    parser.add_argument("--gan", action="store_true", help="also run the DP-GAN in --fast mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="pe_digits_out", help="directory for the figures (default pe_digits_out/)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    epsilons = args.epsilons or ([4.0] if args.fast else [1.0, 4.0, math.inf])
    final = args.final_per_class or (100 if args.fast else 300)
    epochs = 5 if args.fast else 20
    os.makedirs(args.out, exist_ok=True)
    private_x, private_y, test_x, test_y = split(args.seed)
    started = time.perf_counter()
    sim = DigitSimulator(seed=args.seed + 123)
    public = torch.cat([sim.random(c, final) for c in range(CLASSES)])
    public_images, public_labels = sim.render(public), public[:, 0].long()
    from lightning_dp.lightning.synthetic import SyntheticDataModule
    from lightning_dp.mechanism.private_evolution import PEResult

    def as_module(images: torch.Tensor, labels: torch.Tensor) -> SyntheticDataModule:
        plain = PEResult(images / 16.0 - 0.5, labels, list(range(CLASSES)), 0.0, args.delta, 0.0, 0)
        return SyntheticDataModule(plain, batch_size=64)

    rows: list[dict[str, Any]] = [{
        "data": "public simulator only", "epsilon": 0.0,
        "mlp": mlp_accuracy(as_module(public_images, public_labels), test_x, test_y, epochs, args.seed),
        "nearest_mean": nearest_mean_accuracy(public_images, public_labels, test_x, test_y),
    }]
    reports = []
    for epsilon in epsilons:
        settings = FAST if args.fast else SETTINGS.get(epsilon, SETTINGS[4.0])
        t0 = time.perf_counter()
        result, run_sim, frames = synthesize(private_x, private_y, epsilon, settings, final, args.delta, args.seed,
                                             (test_x, test_y))
        pe_seconds = time.perf_counter() - t0
        images = run_sim.render(result.samples)
        # Train anything on it: the datamodule's samples, rendered and scaled like the quickstart's.
        datamodule = result.datamodule(batch_size=64, transform=lambda s, r=run_sim: r.render(s) / 16.0 - 0.5)
        tag = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        png = os.path.join(args.out, f"pe_digits_eps{tag}.png")
        save_frames(frames, png, f"Private Evolution, epsilon {tag}: the population of each iteration (row 0: the "
                                 "public simulator)")
        rows.append({
            "data": "Private Evolution", "epsilon": result.epsilon, "iterations": result.releases,
            "noise_multiplier": result.noise_multiplier, "fallbacks": result.fallbacks, "seconds": pe_seconds,
            "mlp": mlp_accuracy(datamodule, test_x, test_y, epochs, args.seed),
            "nearest_mean": nearest_mean_accuracy(images, result.labels, test_x, test_y),
            "metric_per_iteration": [h["metric"] for h in result.history], "png": png,
        })
        if not math.isinf(epsilon):
            reports.append(build_report(PrivacyRecord.of_service(result)))
            dpsgd = quickstart.main(["--epsilon", str(epsilon), "--delta", str(args.delta), "--seed", str(args.seed),
                                     "--out", os.path.join(args.out, "runs")] + (["--fast"] if args.fast else []))
            rows.append({"data": "DP-SGD on the real digits (quickstart MLP)", "epsilon": dpsgd["epsilon"],
                         "mlp": dpsgd["val_acc"], "nearest_mean": None})
            if args.gan or not args.fast:
                import dp_gan

                gan = dp_gan.main(["--epsilon", str(epsilon), "--delta", str(args.delta), "--seed", str(args.seed),
                                   "--out", os.path.join(args.out, "gan")] + (["--fast"] if args.fast else []))
                rows.append({"data": "DP-GAN (dp_gan.py)", "epsilon": gan["epsilon"], "mlp": None,
                             "nearest_mean": gan["acc_generated"]})
    real = as_module(private_x, private_y)
    rows.append({"data": "real private digits (not private: the ceiling)", "epsilon": math.inf,
                 "mlp": mlp_accuracy(real, test_x, test_y, epochs, args.seed),
                 "nearest_mean": nearest_mean_accuracy(private_x, private_y, test_x, test_y)})
    for report in reports:
        print_report(report)
    _print(rows, time.perf_counter() - started)
    return {"rows": rows, "reports": reports, "seconds": time.perf_counter() - started}


def _print(rows: list[dict[str, Any]], seconds: float) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print()
    print("=" * 72)
    print("accuracy on the 397 real held-out digits of a classifier trained on")
    print(f"{'data':50s} {'epsilon':>8s} {'MLP':>6s} {'mean':>6s}")
    for r in rows:
        print(f"{r['data']:50s} {r['epsilon']:8.3f} {fmt(r['mlp']):>6s} {fmt(r['nearest_mean']):>6s}")
    for r in rows:
        if r["data"] == "Private Evolution":
            print(f"Private Evolution epsilon spent: {r['epsilon']:.3f} ({r['iterations']} Gaussian releases, noise "
                  f"{r['noise_multiplier']:.3f}, {r['fallbacks']} empty histograms); {r['seconds']:.1f} s; {r['png']}")
    print(f"total {seconds:.1f} s")
    print("=" * 72)


if __name__ == "__main__":
    main()
