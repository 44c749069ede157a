"""A small byte-level GPT trained from scratch under a differential privacy budget.

A nanoGPT-style causal language model (token and position embeddings, causal self-attention
blocks, an untied output head) as an ordinary LightningModule, trained on three
public-domain Shakespeare plays kept in ``examples/data/shakespeare`` (nothing is
downloaded). The text is read as bytes, so the vocabulary is the fixed 256 byte values:
building it from the characters of the private text would itself publish something about
the text outside the budget. The corpus is cut into non-overlapping blocks of
``block_size + 1`` bytes; **each block is one training example and so one privacy unit**: the
(epsilon, delta) guarantee bounds what the model reveals about any one block of text (not
about a speaker or a play, which span many blocks). A random 5% of the blocks are held out
for validation.

With ``--canaries N``, :class:`lightning_dp.CanaryExposure` inserts ``N`` secret sentences
("my number is 123456") into the training set ``--canary-repetitions`` times each and
measures at the end how far the model ranks each above random numbers of the same format
(its *exposure*, in bits; about 1.4 for a secret the model never saw). Compare with
``--no-dp`` (the same run without DP): the repeated secrets are then memorised.

    python examples/char_gpt.py                    # about 50 s on 2 CPU cores
    python examples/char_gpt.py --canaries 2       # also measure canary exposure
    python examples/char_gpt.py --canaries 2 --no-dp  # the non-private baseline
    python examples/char_gpt.py --fast             # a few seconds, for smoke tests
    python examples/char_gpt.py --privacy-unit speaker  # protect each character, not each block

With ``--privacy-unit speaker`` the privacy unit is a *person*: everything one character says.
The text is cut per character (each character's speeches, concatenated, into blocks), each block
carries its speaker as its user id, and ``DPStrategy(privacy_unit="user")`` samples characters
(``--batch-size`` is then characters per batch), takes at most ``--max-blocks-per-speaker`` of a
sampled character's blocks, and clips the sum of their gradients as one. ``--speaker-blocks``
cuts the text the same way with the block as the unit, for a comparison on the same data.
    tensorboard --logdir runs                      # dp/epsilon, train_loss, val_loss

``main(argv)`` returns the figures it prints, so a test can call it.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_dp import CanaryExposure, DPStrategy, PrivacyBudget

DATA = Path(__file__).resolve().parent / "data" / "shakespeare"
PLAYS = ("tempest", "macbeth", "hamlet")
VOCAB = 256  # bytes: a vocabulary fixed in advance, not read off the private text
PROMPTS = ("HAMLET.", "MACBETH.", "The ")


def encode(text: str) -> Tensor:
    """Text to byte ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor) -> str:
    """Byte ids to text (undecodable bytes replaced)."""
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


class ShakespeareBlocks(L.LightningDataModule):
    """The plays as non-overlapping blocks of ``block_size + 1`` bytes, split by block.

    Each block is one example (the model reads the first ``block_size`` bytes and predicts
    the last ``block_size``): the privacy unit. With a :class:`~lightning_dp.CanaryExposure`,
    the training set gets its canaries, each encoded as a block of its own (the canary text,
    a newline, then spaces).
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 256,
        plays: tuple[str, ...] = PLAYS,
        val_fraction: float = 0.05,
        canary: Optional[CanaryExposure] = None,
        seed: int = 0,
        by_speaker: bool = False,
    ) -> None:
        super().__init__()
        self.block_size, self.batch_size, self.plays = block_size, batch_size, plays
        self.val_fraction, self.canary, self.seed, self.by_speaker = val_fraction, canary, seed, by_speaker

    def setup(self, stage: str) -> None:
        if self.by_speaker:
            blocks, speakers = self._speaker_blocks()
        else:
            ids = torch.cat([encode((DATA / f"{play}.txt").read_text(encoding="utf-8")) for play in self.plays])
            n = len(ids) // (self.block_size + 1)
            blocks, speakers = ids[: n * (self.block_size + 1)].view(n, self.block_size + 1), []
        n = len(blocks)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, int(n * self.val_fraction))
        self.val_set = TensorDataset(blocks[perm[:n_val]])
        self.train_set: Dataset = TensorDataset(blocks[perm[n_val:]])
        if speakers:
            self.train_set.user_ids = [speakers[i] for i in perm[n_val:].tolist()]  # type: ignore[attr-defined]
        if self.canary is not None:
            self.train_set = self.canary.insert(self.train_set, encode=self.encode_block)

    def _speaker_blocks(self) -> tuple[Tensor, list[str]]:
        """Each character's speeches, concatenated, cut into blocks; the block's user is its
        speaker (``play:NAME``). A speech is a paragraph whose first line is the speaker's name
        and a full stop ("HAMLET.", "Hor.")."""
        blocks, speakers = [], []
        size = self.block_size + 1
        for play in self.plays:
            text: dict[str, list[str]] = {}
            for paragraph in (DATA / f"{play}.txt").read_text(encoding="utf-8").split("\n\n"):
                lines = paragraph.strip("\n").split("\n")
                name = lines[0].strip()
                if len(lines) > 1 and re.fullmatch(r"[A-Z][A-Za-z' ]{0,30}\.", name):
                    text.setdefault(name.rstrip("."), []).append("\n".join(lines[1:]) + "\n")
            for name, speeches in text.items():
                ids = encode("".join(speeches))
                n = len(ids) // size
                if n:
                    blocks.append(ids[: n * size].view(n, size))
                    speakers += [f"{play}:{name}"] * n
        return torch.cat(blocks), speakers

    def encode_block(self, text: str) -> tuple[Tensor]:
        """A text as one training example: its bytes, a newline, padded with spaces."""
        ids = encode(text + "\n")[: self.block_size + 1]
        return (F.pad(ids, (0, self.block_size + 1 - len(ids)), value=ord(" ")),)

    def train_dataloader(self) -> DataLoader:
        # DPStrategy turns this into Poisson sampling at rate batch_size / len(train_set).
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(L.LightningModule):
    """A nanoGPT-style byte-level language model: ``forward(ids)`` returns next-token logits
    of shape ``(batch, time, 256)``. Nothing in it knows about privacy."""

    def __init__(self, block_size: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(VOCAB, dim)
        self.pos_emb = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok_emb(ids) + self.pos_emb(positions)
        return self.head(self.ln_f(self.blocks(x)))

    def _loss(self, block: Tensor) -> Tensor:
        logits = self(block[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), block[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch[0])  # the mean over the batch's tokens, as usual
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch[0]), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    @torch.no_grad()
    def generate(self, prompt: str, new_tokens: int, temperature: float = 0.8, seed: int = 0) -> str:
        """Sample a continuation of ``prompt`` (its own generator: training's state is untouched)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        ids = encode(prompt).to(self.device)[None]
        for _ in range(new_tokens):
            logits = self(ids[:, -self.hparams.block_size :])[:, -1] / temperature
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
        return decode(ids[0])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0, help="privacy budget epsilon (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta (default 1e-5, below 1/N)")
    parser.add_argument("--epochs", type=int, default=6, help="planned epochs; the noise is calibrated to them (default 6)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size (default 256)")
    parser.add_argument("--block-size", type=int, default=32, help="bytes of context per example (default 32)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C (default 1)")
    parser.add_argument("--no-dp", action="store_true", help="train without DP: the non-private baseline")
    parser.add_argument("--canaries", type=int, default=0, help="insert this many secret canaries (default 0)")
    parser.add_argument("--canary-repetitions", type=int, default=10, help="training examples per canary (default 10)")
    parser.add_argument("--samples", type=int, default=200, help="bytes to generate per prompt (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the weights and the noise")
    parser.add_argument("--fast", action="store_true", help="a tiny run on one play, for smoke tests")
    parser.add_argument("--privacy-unit", choices=("block", "speaker"), default="block",
                        help="block: each block of text is protected; speaker: everything one character says")
    parser.add_argument("--max-blocks-per-speaker", type=int, default=16,
                        help="with --privacy-unit speaker: at most this many of a sampled character's blocks per batch")
    parser.add_argument("--speaker-blocks", action="store_true",
                        help="cut the text per character (as --privacy-unit speaker does) with the block as the unit")
    parser.add_argument("--out", default="runs", help="TensorBoard log directory (default runs/)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.fast:
        args.epochs, args.block_size, args.dim, args.layers, args.samples = 1, 32, 32, 1, 60
    L.seed_everything(args.seed, verbose=False)

    canary = None
    if args.canaries:
        # The default log-likelihood calls forward(ids) and reads next-token logits: CharGPT's interface.
        canary = CanaryExposure(
            tokenize=encode, num_canaries=args.canaries, repetitions=args.canary_repetitions, seed=args.seed
        )
    data = ShakespeareBlocks(
        block_size=args.block_size, batch_size=args.batch_size, plays=PLAYS[:1] if args.fast else PLAYS,
        canary=canary, seed=args.seed, by_speaker=args.privacy_unit == "speaker" or args.speaker_blocks,
    )
    by_user = args.privacy_unit == "speaker"
    if by_user and canary is not None:
        raise SystemExit("--canaries measures example-level exposure; use it with --privacy-unit block")
    budget = None if args.no_dp else PrivacyBudget(epsilon=args.epsilon, delta=args.delta)
    callbacks = [c for c in (budget, canary) if c is not None]
    logger = TensorBoardLogger(args.out, name="char_gpt")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        # The engine is left to "auto": the first whose per-example gradients pass the check on this model.
        strategy="auto" if args.no_dp else DPStrategy(
            max_grad_norm=args.max_grad_norm,
            **({"privacy_unit": "user", "max_examples_per_user": args.max_blocks_per_speaker} if by_user else {}),
        ),
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=10,
        limit_train_batches=4 if args.fast else None,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = CharGPT(block_size=args.block_size, dim=args.dim, layers=args.layers, lr=args.lr)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start

    model.eval()
    val_loss = float(trainer.callback_metrics["val_loss"])
    result: dict[str, Any] = {
        "private": budget is not None,
        "epsilon": budget.epsilon_spent if budget is not None else math.inf,
        "delta": args.delta if budget is not None else None,
        "steps": trainer.global_step,
        "noise_multiplier": budget.noise_multiplier if budget is not None else 0.0,
        "engine": trainer.strategy.engine.name if budget is not None else None,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "train_examples": len(data.train_set),
        "privacy_unit": args.privacy_unit,
        "speakers": len(set(getattr(data.train_set, "user_ids", []))),
        "samples": [model.generate(p, args.samples, seed=args.seed + i) for i, p in enumerate(PROMPTS)],
        "fit_seconds": seconds,
        "log_dir": logger.log_dir,
        "stopped_reason": budget.stopped_reason if budget is not None else None,
    }
    if canary is not None:
        result["canary_exposures"] = canary.exposures
        result["reference_exposures"] = canary.reference_exposures
        result["exposure_ceiling"] = canary.ceiling
    _print_report(result, args)
    return result


def _print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print("=" * 72)
    if r["private"]:
        print(f"epsilon spent:        {r['epsilon']:.3f} (budget {args.epsilon:g}), delta {r['delta']:g}")
        print(f"noise multiplier:     {r['noise_multiplier']:.3f} (clipping norm {args.max_grad_norm:g})")
        print(f"per-sample gradients: the '{r['engine']}' engine (chosen by engine='auto')")
        if r["privacy_unit"] == "speaker":
            print(f"privacy unit:         a speaker: everything one of the {r['speakers']} characters says (at most "
                  f"{args.max_blocks_per_speaker} blocks each per batch)")
        else:
            print("privacy unit:         one block of text")
    else:
        print("epsilon spent:        inf (--no-dp: NOT private)")
    print(f"training steps:       {r['steps']} on {r['train_examples']} blocks of {args.block_size + 1} bytes "
          f"in {r['fit_seconds']:.1f} s")
    print(f"validation loss:      {r['val_loss']:.3f} nats/byte (perplexity {r['val_perplexity']:.2f}; "
          f"uniform over bytes: {VOCAB})")
    if "canary_exposures" in r:
        refs = r["reference_exposures"]
        print(f"canary exposure:      {', '.join(f'{e:.2f}' for e in r['canary_exposures'])} bits "
              f"(x{args.canary_repetitions} each; ceiling {r['exposure_ceiling']:.2f})")
        print(f"never-inserted refs:  mean {sum(refs) / len(refs):.2f}, max {max(refs):.2f} bits "
              f"(a random candidate averages 1.44)")
    print(f"TensorBoard logs:     {r['log_dir']}  (tensorboard --logdir {args.out})")
    if r["stopped_reason"]:
        print(f"why training stopped: {r['stopped_reason']}")
    print("samples:")
    for text in r["samples"]:
        print("  | " + text.replace("\n", "\n  | "))
    print("=" * 72)


if __name__ == "__main__":
    main()
