"""Train under PrivacyBudget with a dataset's ledger and kill this process with SIGKILL after a
few steps (no teardown, no commit): for tests/test_ledger_training.py, in a fresh process.

    python tests/ledger_run.py LEDGER_TARGET DATASET OUT_DIR --kill-at-step K
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402

from conftest import Classifier, loader, make_dataset, trainer  # noqa: E402
from lightning_dp import DPStrategy, PrivacyBudget, PrivacyLedger  # noqa: E402


class KillAt(L.Callback):
    def __init__(self, step: int, out: Path) -> None:
        self.step, self.out = step, out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            trainer.save_checkpoint(self.out / "step1.ckpt")  # commits the executed step
        if trainer.global_step == self.step:
            (self.out / "steps").write_text(str(trainer.global_step))
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at-step", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    L.seed_everything(0, verbose=False)
    budget = PrivacyBudget(epsilon=2.0, delta=1e-6, ledger=PrivacyLedger(args.target, args.dataset), run_name="killed")
    t = trainer(max_steps=20, default_root_dir=args.out, strategy=DPStrategy(noise_multiplier=2.0),
                callbacks=[budget, KillAt(args.kill_at_step, args.out)])
    t.fit(Classifier(), loader(make_dataset(n=64), batch_size=8))


if __name__ == "__main__":
    main()
