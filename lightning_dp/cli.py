"""Command line: plan a private run before training it, and report on one after.

    python -m lightning_dp epsilon --dataset-size 60000 --batch-size 256 --epochs 10 --noise-multiplier 1.0 --delta 1e-5
    python -m lightning_dp epsilon --sample-rate 0.004 --steps 2344 --noise-multiplier 1.0 --delta 1e-5
    python -m lightning_dp noise   --dataset-size 60000 --batch-size 256 --epochs 10 --epsilon 1.1 --delta 1e-5
    python -m lightning_dp report  path/to/checkpoint.ckpt [--out DIR]
    python -m lightning_dp ledger show privacy.db [--dataset patients-v3]
    python -m lightning_dp ledger verify privacy.db
    python -m lightning_dp ledger set-total privacy.db --dataset patients-v3 --epsilon 10 --delta 1e-6

Like TF Privacy's ``compute_dp_sgd_privacy``: the last line of output is the figure alone. The
planning commands answer in about a second: they load the accountants without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Any, Optional

_ACCOUNTANTS = ("gdp", "prv", "rdp")  # as lightning_dp.core.accounting.ACCOUNTANTS, without importing it


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
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m lightning_dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{epsilon,noise,report,ledger}")
    common = argparse.ArgumentParser(add_help=False)
    run = common.add_argument_group(
        "the run", "give --sample-rate and --steps, or --dataset-size, --batch-size and --epochs (as DPStrategy "
        "trains: q = batch_size / dataset_size, ceil(dataset_size / batch_size) steps per epoch)"
    )
    run.add_argument("--sample-rate", type=_rate, help="Poisson sampling rate q = batch_size / N, in (0, 1]")
    run.add_argument("--steps", type=_positive_int, help="number of private steps")
    run.add_argument("--dataset-size", type=_positive_int, help="N, the number of training examples")
    run.add_argument("--batch-size", type=_positive_int,
                     help="expected batch size (the DataLoader's batch_size, times the processes with DDP)")
    run.add_argument("--epochs", type=_positive_int, help="number of epochs")
    common.add_argument("--delta", type=_delta, required=True, help="the delta of the guarantee, in (0, 1); well below 1/N")
    common.add_argument("--accountant", choices=_ACCOUNTANTS, default="prv",
                        help="prv: tight numerical bound; rdp: looser, fast; gdp: an estimate, not a bound")
    eps = sub.add_parser("epsilon", parents=[common], formatter_class=formatter,
                         help="epsilon spent by a planned run", description="Epsilon spent by a planned run.")
    eps.add_argument("--noise-multiplier", type=_nonneg, required=True, help="sigma: noise std in units of C")
    noise = sub.add_parser("noise", parents=[common], formatter_class=formatter,
                           help="smallest noise multiplier meeting an epsilon",
                           description="The smallest noise multiplier whose run spends at most --epsilon.")
    noise.add_argument("--epsilon", type=_positive, required=True, help="the epsilon budget")
    report = sub.add_parser("report", formatter_class=formatter,
                            help="the privacy report of a checkpoint written under PrivacyBudget",
                            description="The privacy report of a checkpoint written under PrivacyBudget.")
    report.add_argument("checkpoint", type=Path, help="a Lightning checkpoint (.ckpt) you trust: it is unpickled")
    report.add_argument("--out", type=Path, default=None,
                        help="also write privacy_report.json and privacy_report.png into this directory")
    report.add_argument("--allow-unverified", action="store_true",
                        help="report a ledger that cannot be verified (lightning-dp 0.1, or edited) instead of "
                             "refusing it; the report marks it unverified")
    ledger = sub.add_parser("ledger", help="a dataset's privacy ledger shared by every run (show, verify, set-total)",
                            description="A dataset's privacy ledger (lightning_dp.PrivacyLedger).")
    actions = ledger.add_subparsers(dest="action", required=True, metavar="{show,verify,set-total}",
                                    help="what to do with the ledger")
    for name, text in (("show", "each run and the total spent and remaining; the last line is the total spent"),
                       ("verify", "check the hash chain of every entry; exits 1 when an entry was edited or deleted"),
                       ("set-total", "change a dataset's total (epsilon, delta): an explicit act, recorded")):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                    formatter_class=formatter)
        action.add_argument("target", help="the ledger: a SQLite file, or a postgresql://user@host/db URL")
        action.add_argument("--dataset", required=name == "set-total", default=None,
                            help="the dataset (default: every dataset in the ledger)")
        if name == "set-total":
            action.add_argument("--epsilon", type=_positive, required=True, help="the new total epsilon")
            action.add_argument("--delta", type=_delta, required=True, help="the new total delta")
    return parser


def _run_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, int]:
    """(q, steps) from either way of describing the run."""
    by_rate = args.sample_rate is not None or args.steps is not None
    by_size = any(v is not None for v in (args.dataset_size, args.batch_size, args.epochs))
    if by_rate == by_size:
        parser.error("describe the run with --sample-rate and --steps, or with --dataset-size, --batch-size and "
                     "--epochs (one of the two)")
    if by_rate:
        if args.sample_rate is None or args.steps is None:
            parser.error("--sample-rate and --steps go together")
        return args.sample_rate, args.steps
    if None in (args.dataset_size, args.batch_size, args.epochs):
        parser.error("--dataset-size, --batch-size and --epochs go together")
    if args.batch_size > args.dataset_size:
        parser.error(f"--batch-size {args.batch_size} exceeds --dataset-size {args.dataset_size}")
    return args.batch_size / args.dataset_size, args.epochs * math.ceil(args.dataset_size / args.batch_size)


def _load_accountants_without_torch() -> bool:
    """Opacus's accountants are numpy and scipy, but importing them runs ``opacus/__init__``,
    which imports torch and its per-sample-gradient machinery (about 3 s here), and
    ``opacus/accountants/accountant.py`` imports ``DPOptimizer`` for a type only. For the
    planning commands alone, load the accountants behind a bare ``opacus`` package entry and a
    placeholder ``DPOptimizer``; this process then never imports torch (tests/test_cli.py checks
    that the figures are those of the full import)."""
    if "opacus" in sys.modules or "torch" in sys.modules:
        return False
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = types.ModuleType("opacus")
    package.__path__ = list(spec.submodule_search_locations)
    optimizers = types.ModuleType("opacus.optimizers")
    optimizers.DPOptimizer = type("DPOptimizer", (), {})  # type: ignore[attr-defined]
    sys.modules["opacus"], sys.modules["opacus.optimizers"] = package, optimizers
    return True


def _unload_stubbed(before: set[str]) -> None:
    """Forget every module loaded behind the placeholder ``opacus`` package (and ours that bound
    to it): in a process that goes on (``main`` called from Python), a later ``import opacus``
    must load the real package, not find the placeholder ``DPOptimizer``."""
    for name in set(sys.modules) - before:
        if name == "opacus" or name.startswith(("opacus.", "lightning_dp.")):
            del sys.modules[name]


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    if args.command == "report":
        try:
            return _report(args.checkpoint, args.out, args.allow_unverified)
        except ValueError as err:
            parser.error(str(err))
    if args.command == "ledger":
        try:
            return _ledger(args)
        except ValueError as err:
            parser.exit(2, f"python -m lightning_dp ledger: {err}\n")

    q, steps = _run_shape(parser, args)
    before = set(sys.modules)
    stubbed = _load_accountants_without_torch()
    try:
        return _plan(parser, args, q, steps)
    finally:
        if stubbed:
            _unload_stubbed(before)


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, q: float, steps: int) -> int:
    from lightning_dp.core.accounting import PrivacyHistory, calibrate_noise, compute_epsilon

    delta, accountant = args.delta, args.accountant
    if args.command == "epsilon":
        epsilon = compute_epsilon([(args.noise_multiplier, q, steps)], delta, accountant)
        print(f"DP-SGD with sample rate q={q:g}, noise multiplier {args.noise_multiplier:g}, {steps} steps "
              f"satisfies ({epsilon:.4g}, {delta:g})-DP ({accountant} accountant). Epsilon:")
        print(f"{epsilon:.6g}")
        return 0
    try:
        sigma = calibrate_noise(PrivacyHistory(), q, steps, args.epsilon, delta, accountant)
    except ValueError as err:
        parser.exit(2, f"python -m lightning_dp noise: {err}\n")
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

    from lightning_dp.lightning.budget import PrivacyBudget
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
    budget.verify_checkpoint(checkpoint)
    budget.load_state_dict(state)
    audits = [s for k, s in callbacks.items() if str(k).startswith("PrivacyAudit")]
    audit = audits[0].get("result") if audits else None
    record = dataclasses.replace(budget.record(), safety_checks=state.get("safety_checks"), audit=audit,
                                 noise_multiplier=state.get("noise_multiplier"))
    report = build_report(record)
    if out is not None:
        json_path, png_path = write_report(report, out, budget.history)
        print(f"Wrote {json_path} and {png_path}.")
    print_report(report)
    print(f"Epsilon spent (delta={budget.delta:g}, {budget.accountant} accountant):")
    print(f"{budget.epsilon_spent:.6g}")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    """``ledger show | verify | set-total``: read or change a dataset's ledger (no torch)."""
    import datetime

    from lightning_dp.core.ledger import PrivacyLedger, datasets_in

    if "://" not in args.target and not Path(args.target).is_file():
        raise ValueError(f"no ledger file at {args.target}")
    names = [args.dataset] if args.dataset else datasets_in(args.target)
    if not names:
        raise ValueError(f"{args.target} holds no dataset")
    if args.action == "set-total":
        ledger = PrivacyLedger(args.target, args.dataset)
        before = (ledger.rule.epsilon, ledger.rule.delta)
        ledger.set_total(args.epsilon, args.delta)
        print(f"Dataset {args.dataset!r}: total changed from {before} to ({args.epsilon:g}, {args.delta:g}), recorded in "
              "the ledger.")
        return 0
    status = 0
    total = 0.0
    for name in names:
        ledger = PrivacyLedger(args.target, name)
        if args.action == "verify":
            problems = ledger.verify()
            print(f"{name}: " + ("intact" if not problems else "BROKEN: " + "; ".join(problems)))
            status = status or (1 if problems else 0)
            continue
        rule = ledger.rule
        print(f"Dataset {name!r}: total ({rule.epsilon:g}, {rule.delta:g}), {rule.rule!r} Renyi filter")
        print(f"  {'run':<24} {'kind':<10} {'status':<9} {'epsilon':>8} {'steps':>7}  {'started':<19} host")
        for run in ledger.runs():
            started = datetime.datetime.fromtimestamp(run.started).strftime("%Y-%m-%d %H:%M:%S") if run.started else "?"
            eps = "-" if run.epsilon is None else f"{run.epsilon:.4g}"
            print(f"  {(run.name or run.run_id[:12]):<24} {run.kind:<10} {run.status:<9} {eps:>8} {run.steps:>7}  "
                  f"{started:<19} {run.host}")
        spent = ledger.spent()
        total += spent
        print(f"  chain head {ledger.head()} (keep it outside the database to detect a rewritten chain)")
        print(f"  spent {spent:.4g} of {rule.epsilon:g} (reservations of running or crashed runs count), remaining "
              f"{max(rule.epsilon - spent, 0.0):.4g}. Epsilon spent:")
        print(f"{spent:.6g}")
        ledger.close()
    return status
