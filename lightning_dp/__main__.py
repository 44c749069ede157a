"""Command line: plan a private run before training it.

    python -m lightning_dp epsilon --sample-rate 0.004 --noise-multiplier 1.0 --steps 2344 --delta 1e-5
    python -m lightning_dp noise   --sample-rate 0.004 --epsilon 1.1 --steps 2344 --delta 1e-5

Like TF Privacy's ``compute_dp_sgd_privacy``: the last line of output is the figure alone.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
