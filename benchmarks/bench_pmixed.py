"""PMixED tokens per second against plain generation with the public model, side by side in one run.

    python benchmarks/bench_pmixed.py                 # SmolLM2-135M, 4 members, writes benchmarks/RESULTS_pmixed.md
    python benchmarks/bench_pmixed.py --tokens 8      # a quick look

Rows (the same prompt, the same number of new tokens, sampling):
``public, generate()``: Hugging Face ``generate`` on the public model (key-value cache), the floor.
``PMixED, separate members``: each member its own model, one full forward of the whole context per
sampled member and for the public model per token (no cache).
``PMixED, LoRAEnsemble``: the members as adapters of one base, sampled members in one multi-adapter
batch, key-value caches for the public model and the members.
Members are LoRA adapters with random (non-zero) weights: speed does not depend on training.
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def members_of(base: torch.nn.Module, n: int, rank: int = 8) -> list[torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    import finetune_llm as ft

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ft.LORA_TARGETS, init_lora_weights=False)
    return [get_peft_model(copy.deepcopy(base), config).eval() for _ in range(n)]


def _last(model: torch.nn.Module) -> Any:
    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0, -1]

    return logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(HERE / "RESULTS_pmixed.md"))
    args = parser.parse_args(argv)
    import finetune_llm as ft

    from lightning_dp import PMixED
    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble

    torch.set_num_threads(torch.get_num_threads())
    tokenizer, base = ft.load_pretrained(ft.find_gguf())
    base.eval()
    text = (ft.DATA / f"{ft.PLAYS[0]}.txt").read_text(encoding="utf-8")
    prompt = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens])
    members = members_of(base, args.members)
    ensemble = LoRAEnsemble(members)
    budget = 10 * args.tokens

    def timed(fn: Any) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        return args.tokens / (time.perf_counter() - start)

    def plain() -> None:
        with torch.no_grad():
            base.generate(prompt.reshape(1, -1), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True, use_cache=True,
                          pad_token_id=tokenizer.eos_token_id)

    def service(public: Any, models: Any) -> Any:
        s = PMixED(public, models, epsilon=8.0, delta=1e-5, query_budget=budget, sample_rate=args.sample_rate,
                   generator=torch.Generator().manual_seed(0))
        return lambda: s.generate(prompt, args.tokens)

    rows = {
        "public, generate()": timed(plain),
        "PMixED, separate members": timed(service(_last(base), [_last(m) for m in members])),
        "PMixED, LoRAEnsemble": timed(service(ensemble.public, ensemble)),
    }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    floor = rows["public, generate()"]
    lines = [f"# PMixED generation speed\n\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}. SmolLM2-135M, {args.members} LoRA members (rank 8, attention "
             f"projections), sample rate {args.sample_rate:g}, a {len(prompt)}-token prompt, {args.tokens} new tokens; "
             f"`python benchmarks/bench_pmixed.py`. Peak resident memory of the whole run {peak_mb:.0f} MB.\n",
             "| generation | tokens/s | vs public generate() |", "|---|---|---|"]
    lines += [f"| {name} | {tps:.2f} | {tps / floor:.2f}x |" for name, tps in rows.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).write_text(table)
    return rows


if __name__ == "__main__":
    main()
