"""DDP scenarios on 2 CPU processes (gloo), one after the other in the same pair of processes,
for tests/test_ddp.py.

    python tests/ddp_run.py ROOT SCENARIO [SCENARIO ...]

Lightning's launcher re-runs this script for rank 1 (once: the later trainers find the processes
already started). Each rank writes ROOT/SCENARIO/rank{r}.pt, holding {"error": message} for a
scenario whose fit raised; the next scenario still runs, so a refusal must stop every rank alike
(a rank left waiting would hang the next scenario, and the test's timeout turns that into a
failure). One launch instead of one per scenario: each launch costs two interpreters importing
Lightning.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

from conftest import Batches, Classifier, loader, make_dataset, snapshot  # noqa: E402
from lightning_dp import DPDDPStrategy, PrivacyBudget, PrivacyLedger  # noqa: E402


class ZeroGrad(Classifier):
    """Zero gradient for every example: the update is the noise alone."""

    def __init__(self) -> None:
        super().__init__(d=50)
        self.net = nn.Linear(50, 200)

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, _ = batch
        return (self.net(torch.zeros_like(x)) * 0.0).mean()


def main(root: Path, scenarios: list[str]) -> None:
    warnings.simplefilter("ignore")
    for scenario in scenarios:
        out = root / scenario
        try:
            result = run(scenario, out)
        except Exception as e:  # noqa: BLE001 - recorded for the test to read
            result = {"error": f"{type(e).__name__}: {e}"}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / f"rank{os.environ.get('LOCAL_RANK', '0')}.pt")


def run(scenario: str, out: Path) -> dict:
    L.seed_everything(0, verbose=False)
    rec = Batches()
    callbacks: list[L.Callback] = [rec]
    fit_kwargs: dict = {}
    budget = None
    n, b, d = 64, 8, 6
    model: L.LightningModule = Classifier(lr=1.0)
    if scenario == "update":
        strategy = DPDDPStrategy(max_grad_norm=0.1, noise_multiplier=0.0)
        limits = {"max_steps": 1}
    elif scenario == "noise":
        model, d = ZeroGrad(), 50
        strategy = DPDDPStrategy(max_grad_norm=2.0, noise_multiplier=1.5)
        limits = {"max_steps": 1}
    elif scenario in ("budget", "first", "resume"):
        sigma = None if scenario == "budget" else 1.0
        budget = PrivacyBudget(epsilon=2.0 if scenario == "budget" else 50.0, delta=1e-5)
        strategy = DPDDPStrategy(noise_multiplier=sigma)
        callbacks += [budget, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)]
        limits = {"max_epochs": 4 if scenario == "resume" else 2}
        if scenario == "resume":
            fit_kwargs["ckpt_path"] = str(out.parent / "first" / "ckpt" / "last.ckpt")
    elif scenario == "stop":  # a fixed noise: the budget, not the plan, ends the run
        budget = PrivacyBudget(epsilon=6.0, delta=1e-5)
        callbacks.append(budget)
        strategy = DPDDPStrategy(noise_multiplier=1.0)
        limits = {"max_epochs": 50}
    elif scenario in ("ledger", "ledger_refused"):  # the dataset's ledger: out.parent / "ledger.db"
        ledger = PrivacyLedger(str(out.parent / "ledger.db"), "patients")
        budget = PrivacyBudget(epsilon=3.0 if scenario == "ledger" else 50.0, delta=1e-6, ledger=ledger, run_name="ddp")
        callbacks.append(budget)
        strategy = DPDDPStrategy(noise_multiplier=1.5 if scenario == "ledger" else 0.5)
        limits = {"max_epochs": 2}
    elif scenario in ("users", "users_mismatch"):  # user-level: 8 users of 1-5 examples, all sampled (q = 2 * 4 / 8)
        strategy = DPDDPStrategy(max_grad_norm=0.05, noise_multiplier=0.0, privacy_unit="user", max_examples_per_user=3)
        limits = {"max_steps": 1}
        n = 24
    elif scenario == "empty":
        n, b = 16, 1  # q = 2/16: many empty draws, often on one process only
        strategy = DPDDPStrategy(noise_multiplier=1.0)
        limits = {"max_epochs": 2}
    else:
        raise SystemExit(f"unknown scenario {scenario}")

    before = snapshot(model)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, callbacks=callbacks, logger=False,
        enable_checkpointing=budget is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **limits,
    )
    data = make_dataset(n=n, d=d)
    if scenario in ("users", "users_mismatch"):
        data.user_ids = [u for u, size in enumerate((1, 5, 2, 4, 3, 1, 5, 3)) for _ in range(size)]  # type: ignore[attr-defined]
        if scenario == "users_mismatch" and os.environ.get("LOCAL_RANK", "0") == "1":
            data.user_ids = data.user_ids[::-1]  # type: ignore[attr-defined]  # another order on process 1
        b = 4
    trainer.fit(model, loader(data, batch_size=b), **fit_kwargs)
    x, y = rec.examples if any(bt.size for bt in rec.batches) else (torch.zeros(0, d), torch.zeros(0))
    return {
        "before": before,
        "after": snapshot(model),
        "x": x,
        "y": y,
        "sizes": rec.sizes,
        "global_step": trainer.global_step,
        "history": trainer.strategy.history.segments,
        "steps": budget.steps if budget else None,
        "epsilon": budget.epsilon_spent if budget else None,
        "noise_multiplier": trainer.strategy.noise_multiplier,
        "sample_rate": trainer.strategy.sample_rate,
        "engine": trainer.strategy.engine.name,
        "units": [d.units for d in rec.batches],
        "expected": [d.expected_size for d in rec.batches],
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
