"""Command line: plan a private run before training it, and report on one after.

    python -m lightning_dp epsilon --sample-rate 0.004 --noise-multiplier 1.0 --steps 2344 --delta 1e-5
    python -m lightning_dp noise   --sample-rate 0.004 --epsilon 1.1 --steps 2344 --delta 1e-5
    python -m lightning_dp report  path/to/checkpoint.ckpt [--out DIR]

Like TF Privacy's ``compute_dp_sgd_privacy``: the last line of output is the figure alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from lightning_dp.accounting import ACCOUNTANTS, PrivacyHistory, calibrate_noise, compute_epsilon


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _delta(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _nonneg(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sample-rate", type=_rate, required=True, help="Poisson rate q = batch_size / N")
    common.add_argument("--steps", type=_positive_int, required=True, help="number of private steps")
    common.add_argument("--delta", type=_delta, required=True)
    common.add_argument("--accountant", choices=sorted(ACCOUNTANTS), default="prv")
    eps = sub.add_parser("epsilon", parents=[common], help="epsilon spent by a planned run")
    eps.add_argument("--noise-multiplier", type=_nonneg, required=True)
    noise = sub.add_parser("noise", parents=[common], help="smallest noise multiplier meeting an epsilon")
    noise.add_argument("--epsilon", type=float, required=True)
    report = sub.add_parser("report", help="the privacy report of a checkpoint written under PrivacyBudget")
    report.add_argument("checkpoint", type=Path, help="a Lightning checkpoint (.ckpt) you trust: it is unpickled")
    report.add_argument("--out", type=Path, default=None,
                        help="also write privacy_report.json and privacy_report.png into this directory")
    report.add_argument("--allow-unverified", action="store_true",
                        help="report a ledger that cannot be verified (lightning-dp 0.1, or edited) instead of "
                             "refusing it; the report marks it unverified")
    args = parser.parse_args(argv)

    if args.command == "report":
        try:
            return _report(args.checkpoint, args.out, args.allow_unverified)
        except ValueError as err:
            parser.error(str(err))

    q, steps, delta, accountant = args.sample_rate, args.steps, args.delta, args.accountant
    if args.command == "epsilon":
        epsilon = compute_epsilon([(args.noise_multiplier, q, steps)], delta, accountant)
        print(f"DP-SGD with sample rate q={q:g}, noise multiplier {args.noise_multiplier:g}, {steps} steps "
              f"satisfies ({epsilon:.4g}, {delta:g})-DP ({accountant} accountant). Epsilon:")
        print(f"{epsilon:.6g}")
        return 0
    if not args.epsilon > 0:
        parser.error("--epsilon must be > 0")
    sigma = calibrate_noise(PrivacyHistory(), q, steps, args.epsilon, delta, accountant)
    spent = compute_epsilon([(sigma, q, steps)], delta, accountant)
    print(f"For ({args.epsilon:g}, {delta:g})-DP over {steps} steps at sample rate q={q:g} ({accountant} accountant) "
          f"use a noise multiplier of at least {sigma:.4g} (it spends epsilon {spent:.4g}). Noise multiplier:")
    print(f"{sigma:.6g}")
    return 0


def _report(path: Path, out: Optional[Path], allow_unverified: bool = False) -> int:
    """Print (and with ``out`` write) the privacy report of the checkpoint at ``path``."""
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {path}")
    import torch

    from lightning_dp.budget import PrivacyBudget
    from lightning_dp.report import build_report, print_report, write_report

    # weights_only=False: a Lightning checkpoint holds more than tensors (hyperparameters,
    # loop state), and this command runs on a file the user names, like Trainer.fit(ckpt_path=).
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged or foreign file: say which, not a pickle traceback
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    callbacks: dict[str, Any] = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    states = [s for k, s in callbacks.items() if str(k).startswith("PrivacyBudget") and "history" in s]
    if not states:
        raise ValueError(
            f"{path} holds no PrivacyBudget state: it was not trained with callbacks=[PrivacyBudget(...)] (or "
            "was saved without callback states), so no epsilon can be reported for it."
        )
    state = states[0]
    budget = PrivacyBudget(
        state["epsilon"], state["delta"], state["accountant"], max_advantage=state.get("max_advantage"),
        max_tpr_at_fpr=state.get("max_tpr_at_fpr") or None, kappa=state.get("kappa"),
        allow_unverified_ledger=allow_unverified,
    )
    budget.verify_binding(checkpoint)
    budget.load_state_dict(state)
    audits = [s for k, s in callbacks.items() if str(k).startswith("PrivacyAudit")]
    audit = None
    if audits and audits[0].get("result") is not None:
        from lightning_dp.audit import AuditResult

        audit = AuditResult(**audits[0]["result"])
    report = build_report(budget, audit, state.get("safety_checks"))
    if budget.history.steps == 0 and state.get("noise_multiplier") is not None:
        report["noise_multiplier"] = state["noise_multiplier"]
    if out is not None:
        json_path, png_path = write_report(report, out, budget.history)
        print(f"Wrote {json_path} and {png_path}.")
    print_report(report)
    print(f"Epsilon spent (delta={budget.delta:g}, {budget.accountant} accountant):")
    print(f"{budget.epsilon_spent:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
