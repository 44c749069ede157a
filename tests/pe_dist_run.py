"""Private Evolution on 2 CPU processes (gloo), each holding a shard of the private set, for
tests/test_private_evolution.py.

    python tests/pe_dist_run.py RANK WORLD_SIZE PORT OUT_DIR

Each rank writes OUT_DIR/rank{r}.pt: its clean histogram of a fixed population (summed over the
processes) and the samples of a whole PE run on the shards (sharded=True) and on the whole set in
every process (the default).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pe_toys import private_set, toy_evolution  # noqa: E402
from lightning_dp import PrivacyLedger  # noqa: E402
from lightning_dp.mechanism.private_evolution import PrivateVotes  # noqa: E402


def main(rank: int, world: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = private_set()
    shard = slice(rank, None, world)  # each process votes with its own shard only
    population = {c: torch.randn(30, 2, generator=torch.Generator().manual_seed(c)) for c in range(3)}
    votes = PrivateVotes(x[shard], y[shard], [0, 1, 2], lambda s: s, 2, "l2", 7, None, sharded=True)
    clean = votes.histograms(population)
    result = toy_evolution().fit(x[shard], y[shard], sharded=True)
    whole = toy_evolution().fit(x, y)  # not sharded: every process holds the whole set, nothing is summed
    ledger = PrivacyLedger(str(out / "ledger.db"), "points", epsilon=20.0, delta=1e-5)
    dist.barrier()  # both processes open the ledger before either job starts
    toy_evolution(ledger=ledger).fit(x[shard], y[shard], sharded=True)
    torch.save({"clean": clean, "samples": result.samples, "labels": result.labels, "history": result.history,
                "whole": whole.samples}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
