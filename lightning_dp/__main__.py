"""``python -m lightning_dp``: the command line (:mod:`lightning_dp.cli`)."""

import sys

from lightning_dp.cli import main

if __name__ == "__main__":
    sys.exit(main())
