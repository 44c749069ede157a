"""Train a model whose every per-example gradient is zero, so each released gradient is the step's
noise alone, and save those noise vectors: for tests/test_streams.py, in a fresh process.

    python tests/noise_run.py OUT_DIR [--resume CKPT] [--seed N]

Writes OUT_DIR/noise.pt (one row per step: the noise vector times the expected batch size) and,
without --resume, OUT_DIR/step2.ckpt after the second step.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from conftest import loader, make_dataset, trainer  # noqa: E402
from helpers import NoiseOnly  # noqa: E402
from lightning_dp import DPStrategy, PrivacyBudget  # noqa: E402


class SaveAtStep2(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            trainer.save_checkpoint(self.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    L.seed_everything(0, verbose=False)  # what every Lightning script does
    model = NoiseOnly()
    callbacks: list[L.Callback] = [PrivacyBudget(epsilon=50.0, delta=1e-5)]
    if args.resume is None:
        callbacks.append(SaveAtStep2(args.out / "step2.ckpt"))
    t = trainer(max_steps=4, strategy=DPStrategy(noise_multiplier=1.0, seed=args.seed), callbacks=callbacks)
    t.fit(model, loader(make_dataset(n=64, d=NoiseOnly.D), batch_size=8), ckpt_path=args.resume)
    torch.save(torch.stack(model.noise), args.out / "noise.pt")


if __name__ == "__main__":
    main()
