"""Private next-token prediction with PMixED: SmolLM2-135M as the public model, LoRA members
fine-tuned non-privately on disjoint partitions of the plays, and each generated or scored token
differentially private for the partitions.

Phase I trains ``--members`` LoRA adapters, one per partition of the training blocks (a block's
partition is a hash of its id), with a plain Lightning Trainer: the members are **not private**
and stay inside this process. Phase II answers one query per token with
:class:`lightning_dp.PMixED` (each member sampled with rate ``--sample-rate``, projected onto a
Renyi ball around the public model, averaged). The evaluation scores every token of
``--eval-blocks`` held-out blocks, each a query, under **one** budget over the whole evaluation
and a short sample (the paper restarts a fresh budget every 1024-token window; here one budget
covers every token scored and sampled), and compares the per-token perplexity with the public model, one non-private LoRA
fine-tune on all the training blocks, and (unless ``--no-dpsgd``) DP-SGD LoRA fine-tuning at the
same epsilon and delta on the same data.

    python examples/pmixed_generate.py --fast     # about a minute on 2 CPU cores
    python examples/pmixed_generate.py

``main(argv)`` returns the figures it prints.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import finetune_llm as ft  # noqa: E402  (the SmolLM2 loading, blocks and LoRA of the fine-tuning example)
from lightning_dp import PMixED  # noqa: E402
from lightning_dp.report import PrivacyRecord, build_report, print_report  # noqa: E402
from lightning_dp.lightning.ensemble import train_ensemble  # noqa: E402
from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble  # noqa: E402

FAST = dict(block_size=16, members=4, member_steps=3, batch_size=8, eval_blocks=1, val_blocks=16, dpsgd_steps=4,
            sample_tokens=8)
FULL = dict(block_size=32, members=8, member_steps=30, batch_size=16, eval_blocks=8, val_blocks=64, dpsgd_steps=60,
            sample_tokens=32)


def _last_logits(model: torch.nn.Module) -> Any:
    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.reshape(1, -1)).logits[0, -1]

    return logits


@torch.no_grad()
def token_nll(next_distribution: Any, blocks: torch.Tensor) -> list[float]:
    """The negative log-probability of every token after the first of each block, given the
    tokens before it."""
    out = []
    for block in blocks:
        for t in range(1, len(block)):
            p = next_distribution(block[:t])
            out.append(-math.log(max(float(p[int(block[t])]), 1e-300)))
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--epsilon", type=float, default=8.0, help="epsilon over the whole evaluation (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--sample-rate", type=float, default=0.5, help="members sampled per query (default 0.5)")
    parser.add_argument("--lr", type=float, default=2e-3, help="the members' AdamW learning rate (default 2e-3)")
    parser.add_argument("--no-dpsgd", action="store_true", help="skip the DP-SGD comparison run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs", help="TensorBoard directory of the DP-SGD run (default runs/)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    s = dict(FAST if args.fast else FULL)
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    tokenizer, base = ft.load_pretrained(ft.find_gguf())
    train_set, val_set = ft.split_blocks(ft.token_blocks(tokenizer, s["block_size"]), s["val_blocks"], args.seed)
    eval_blocks = val_set[: s["eval_blocks"]]
    queries = int(eval_blocks.numel() - len(eval_blocks))  # scored tokens; the sample's tokens come on top

    # Phase I: the members, non-private, one per partition of the training blocks.
    members = train_ensemble(
        lambda m: ft.LoRAFineTune(ft.add_lora(base, 8, args.seed + m), lr=args.lr), TensorDataset(train_set),
        s["members"], batch_size=s["batch_size"], keys=[f"block {i}" for i in range(len(train_set))],
        trainer_kwargs=dict(max_steps=s["member_steps"], accelerator="cpu", enable_progress_bar=False),
    )
    phase1 = time.perf_counter() - started

    # Phase II: every scored token is one query of one budget. The members' adapters are stacked on
    # one copy of the base (one batch per query, key-value caches); the trained members are dropped.
    ensemble = LoRAEnsemble([m.model for m in members])
    del members
    service = PMixED(ensemble.public, ensemble, epsilon=args.epsilon, delta=args.delta,
                     query_budget=queries + s["sample_tokens"], sample_rate=args.sample_rate)
    start = time.perf_counter()
    pmixed_nll = token_nll(lambda ids: service.next_token_distribution(ids), eval_blocks)
    pmixed_seconds = time.perf_counter() - start
    prompt = val_set[-1][: s["block_size"] // 2]
    sample = tokenizer.decode(service.generate(prompt, s["sample_tokens"]).tolist())
    report = build_report(PrivacyRecord.of_service(service))
    public_nll = token_nll(lambda ids: torch.softmax(_last_logits(base)(ids).double(), 0), eval_blocks)

    # One non-private fine-tune on all the training blocks, and DP-SGD at the same (epsilon, delta).
    comparison_args = argparse.Namespace(lora_rank=8, seed=args.seed, lr=1e-2, nonprivate_lr=args.lr,
                                         epsilon=args.epsilon, delta=args.delta, max_grad_norm=1.0,
                                         max_physical_batch_size=16, out=args.out)
    settings = dict(steps=s["member_steps"] * s["members"], batch_size=s["batch_size"])
    nonprivate, _ = ft.train(base, train_set, comparison_args, settings, private=False)
    nonprivate_nll = token_nll(lambda ids: torch.softmax(_last_logits(nonprivate.eval())(ids).double(), 0), eval_blocks)
    result: dict[str, Any] = {
        "queries": service.queries_used, "scored": queries, "sample": sample, "report": report,
        "members": s["members"], "sample_rate": args.sample_rate, "beta": service.beta,
        "alpha": service.alpha, "epsilon": service.epsilon_spent, "delta": args.delta,
        "ppl_pmixed": math.exp(sum(pmixed_nll) / queries), "ppl_public": math.exp(sum(public_nll) / queries),
        "ppl_nonprivate": math.exp(sum(nonprivate_nll) / queries), "phase1_seconds": phase1,
        "pmixed_seconds_per_token": pmixed_seconds / queries,
    }
    if not args.no_dpsgd:
        settings = dict(steps=s["dpsgd_steps"], batch_size=s["batch_size"])
        dpsgd, info = ft.train(base, train_set, comparison_args, settings, private=True)
        dpsgd_nll = token_nll(lambda ids: torch.softmax(_last_logits(dpsgd.eval())(ids).double(), 0), eval_blocks)
        result.update(ppl_dpsgd=math.exp(sum(dpsgd_nll) / queries), dpsgd_epsilon=info["epsilon"])
    result["total_seconds"] = time.perf_counter() - started
    print_report(report)
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    print()
    print("=" * 72)
    print(f"PMixED: {r['members']} non-private LoRA members (one per partition), sample rate {r['sample_rate']:g}, "
          f"order {r['alpha']}, ball radius beta {r['beta']:.4g}")
    print(f"epsilon spent:        {r['epsilon']:.3f} over {r['queries']} queries (delta {r['delta']:g}; the privacy unit "
          "is one partition)")
    print(f"PMixED sample:        {r['sample']!r}")
    print(f"per-token perplexity on the same {r['scored']} held-out tokens:")
    print(f"  public model         {r['ppl_public']:.2f}")
    print(f"  PMixED               {r['ppl_pmixed']:.2f}")
    if "ppl_dpsgd" in r:
        print(f"  DP-SGD LoRA          {r['ppl_dpsgd']:.2f} (epsilon {r['dpsgd_epsilon']:.3f})")
    print(f"  non-private LoRA     {r['ppl_nonprivate']:.2f}")
    print(f"phase I {r['phase1_seconds']:.1f} s; PMixED {r['pmixed_seconds_per_token'] * 1000:.0f} ms per token; "
          f"total {r['total_seconds']:.1f} s")
    print("=" * 72)


if __name__ == "__main__":
    main()
