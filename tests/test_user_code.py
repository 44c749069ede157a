"""Code written the way people write it: hooks and callbacks that read the batch, Hugging Face
causal LMs with default configs and padded batches, torchmetrics in training_step, bf16."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import Batches, Classifier, clipped_sum, loader, make_dataset, snapshot, trainer
from lightning_dp import DPStrategy, causal_lm_loss
from lightning_dp.mechanism.grads.check import LossNotPerExample


# --------------------------------------------------------------------------- hooks see the user's batch
@dataclasses.dataclass
class Pair:
    """A custom batch class, as people write them (Lightning moves it with its .to())."""

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: Any) -> "Pair":
        return Pair(self.x.to(device), self.y.to(device))


def as_dict(items: list) -> dict:
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


def as_pair(items: list) -> Pair:
    return Pair(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if isinstance(batch, Pair):
        return batch.x, batch.y
    x, y = batch
    return x, y


class ReadsTheBatch(Classifier):
    """Its hooks read the batch as the user's code would; training_step too."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.hook_sizes: list[int] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        x, y = unpack(batch)
        assert len(x) == len(y)
        self.hook_sizes.append(len(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        x, y = unpack(batch)
        return self.loss(x, y)


class CountsTokens(L.Callback):
    """A callback that logs per-batch figures from the batch and the step's output."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, _ = unpack(batch)
        self.sizes.append(len(x))
        self.losses.append(float(outputs["loss"]) if outputs else math.nan)


@pytest.mark.parametrize("collate", [None, as_dict, as_pair], ids=["tuple", "dict", "dataclass"])
@pytest.mark.parametrize("max_physical", [None, 3])
def test_hooks_and_callbacks_see_the_whole_draw_in_the_users_format(collate, max_physical) -> None:
    model, counter, rec = ReadsTheBatch(), CountsTokens(), Batches()
    t = trainer(max_steps=12, strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=max_physical),
                callbacks=[counter, rec])
    t.fit(model, DataLoader(make_dataset(n=64), batch_size=4, shuffle=True, collate_fn=collate))
    draws = [d.size for d in rec.batches]
    assert model.hook_sizes == counter.sizes == draws  # the whole Poisson draw, not a chunk
    if max_physical:
        assert any(len(d.chunks) > 1 for d in rec.batches)  # chunks happened, and stayed internal
    for size, loss in zip(counter.sizes, counter.losses):
        assert math.isfinite(loss) if size else math.isnan(loss)  # outputs carries the step's loss


def test_an_empty_draw_reaches_the_hooks_as_an_empty_batch_of_the_users_format() -> None:
    model, counter = ReadsTheBatch(), CountsTokens()
    t = trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[counter])
    t.fit(model, DataLoader(make_dataset(n=40), batch_size=1, shuffle=True, collate_fn=as_pair))  # q = 1/40
    assert 0 in counter.sizes and t.global_step == 40


# --------------------------------------------------------------------------- Hugging Face causal LMs
VOCAB = 64


class Texts(Dataset):
    """Token sequences of different lengths, as tokenised text is."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 14, (n,), generator=g)
        self.items = [torch.randint(1, VOCAB, (int(k),), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i]}


def pad(items: list[dict]) -> dict:
    """What a tokenizer's padding collator does: right padding, attention mask, labels -100."""
    length = max(len(i["input_ids"]) for i in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, item in enumerate(items):
        ids[k, : len(item["input_ids"])] = item["input_ids"]
        mask[k, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def gpt2(dropout: bool = True) -> nn.Module:
    extra = {} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, **extra))


def llama(dropout: bool = True) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        attention_dropout=0.1 if dropout else 0.0))


class FineTune(L.LightningModule):
    def __init__(self, build: Any, hf_loss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build()
        self.hf_loss = hf_loss

    def loss(self, batch: dict) -> torch.Tensor:
        if self.hf_loss:
            return self.model(**batch).loss
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss(out.logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_default_config_lms_with_padded_batches_train_on_the_fast_engine(build) -> None:
    model = FineTune(build)
    assert model.model.config.to_dict().get("attn_pdrop", 0.1) > 0 or model.model.config.attention_dropout > 0
    t = trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=4))
    t.fit(model, DataLoader(Texts(), batch_size=8, shuffle=True, collate_fn=pad))
    assert t.strategy.engine.name == "ghost" and t.strategy.grad_check["verified"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_padded_lm_batches_get_the_exact_dp_update(build) -> None:
    c, b = 0.05, 8
    model, reference = FineTune(lambda: build(dropout=False)), FineTune(lambda: build(dropout=False))
    reference.load_state_dict(model.state_dict())
    before, rec = snapshot(model), Batches()
    t = trainer(max_steps=1, callbacks=[rec], strategy=DPStrategy(max_grad_norm=c, noise_multiplier=0.0,
                                                                     max_physical_batch_size=3))
    with pytest.warns(UserWarning, match="NOT differentially private"):
        t.fit(model, DataLoader(Texts(), batch_size=b, shuffle=True, collate_fn=pad))
    assert t.strategy.engine.name == "ghost"
    (draw,) = rec.batches
    whole = draw.whole
    # Brute force: each example alone, unpadded, through the reference model.
    params = list(reference.parameters())
    grads = []
    for k in range(draw.size):
        n = int(whole["attention_mask"][k].sum())
        one = pad([{"input_ids": whole["input_ids"][k, :n]}])
        grads.append(list(torch.autograd.grad(reference.loss(one), params)))
    expected = [g / b for g in clipped_sum(grads, c, params)]
    for p0, p, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p0 - p.detach(), 0.5 * e, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_hugging_faces_own_loss_is_refused_with_the_fix() -> None:
    t = trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0))
    with pytest.raises(LossNotPerExample, match="causal_lm_loss"):
        t.fit(FineTune(gpt2, hf_loss=True), DataLoader(Texts(), batch_size=8, shuffle=True, collate_fn=pad))


def test_causal_lm_loss_is_each_sequences_mean_then_the_batch_mean() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 1, -100, -100, -100], [2, -100, -100, -100, -100]])
    per = []
    for k in range(2):  # the third sequence has no token to predict: it contributes 0
        n = int((labels[k] != -100).sum())
        per.append(nn.functional.cross_entropy(logits[k, : n - 1], labels[k, 1:n]))
    expected = (per[0] + per[1] + 0.0) / 3
    assert torch.allclose(causal_lm_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="batch, length, vocab"):
        causal_lm_loss(logits[0], labels)


def test_causal_lm_loss_ignores_non_finite_logits_at_ignored_positions() -> None:
    # A fully masked left-padding row can give NaN logits at positions whose label is ignored: the
    # loss and the gradient must not see them (else the example is dropped as non-finite).
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [6, 1, 2, -100, -100]])
    clean = causal_lm_loss(logits, labels)
    poisoned = logits.clone()
    poisoned[0, 0], poisoned[1, 3:] = math.nan, math.inf  # predict ignored labels (shifted: 1 and 4)
    poisoned.requires_grad_(True)
    loss = causal_lm_loss(poisoned, labels)
    loss.backward()
    assert torch.equal(loss.detach(), clean)
    assert torch.isfinite(poisoned.grad).all()


# --------------------------------------------------------------------------- torchmetrics, bf16
class WithMetric(Classifier):
    def __init__(self, recurrent: bool = False) -> None:
        super().__init__(lr=0.1)
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
        self.rnn = nn.GRU(6, 8, batch_first=True) if recurrent else None
        self.counted: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        x, y = batch
        if self.rnn is not None:
            x = x + self.rnn(x.unsqueeze(1))[0].squeeze(1).sum(1, keepdim=True)
        logits = self.net(x)
        self.acc(logits, y)
        self.log("train_acc", self.acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.counted.append(int(self.acc.tp.sum() + self.acc.fn.sum()))


@pytest.mark.parametrize("recurrent", [False, True], ids=["mlp", "gru"])
def test_a_torchmetrics_metric_in_training_step_counts_only_the_trained_examples(recurrent: bool) -> None:
    model, rec = WithMetric(recurrent), Batches()
    t = trainer(max_steps=4, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[rec])
    t.fit(model, loader(make_dataset(n=64), batch_size=8))
    # ghost for the MLP; for the GRU, functorch's vmap cannot run the metric: passed over, not a crash.
    assert t.strategy.engine.name == ("loop" if recurrent else "ghost")
    sizes = [d.size for d in rec.batches]
    assert model.counted == [sum(sizes[: k + 1]) for k in range(len(sizes))]  # the check added nothing


def test_bf16_mixed_precision_trains_on_the_ghost_engine() -> None:
    model = Classifier(lr=0.1)
    t = trainer(max_steps=4, precision="bf16-mixed", strategy=DPStrategy(noise_multiplier=1.0))
    t.fit(model, loader(make_dataset(n=64), batch_size=8))
    assert t.strategy.engine.name == "ghost"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- code that keeps state
class EmaTeacher(Classifier):
    """Keeps state in training_step, skipping it while the strategy only checks."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.losses: list[float] = []
        self.updates = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if not self.trainer.strategy.checking:
            self.losses.append(float(loss))
            self.updates += 1
        return loss


class Augmented(torch.utils.data.Dataset):
    """Random augmentation with Python's and numpy's global generators."""

    def __init__(self) -> None:
        self.base = make_dataset(n=32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.base[i]
        return x + random.gauss(0.0, 0.01) + float(np.random.normal(0.0, 0.01)), y


def test_stateful_code_can_tell_checks_from_steps_and_checks_keep_the_global_rngs(monkeypatch) -> None:
    import random

    import numpy as np

    import lightning_dp.lightning.private_step as private_step

    monkeypatch.setattr(private_step, "SPOT_CHECK_EVERY", 1)  # a spot check at every step
    model, sizes = EmaTeacher(), Batches()
    t = trainer(max_steps=6, strategy=DPStrategy(noise_multiplier=1.0), callbacks=[sizes])
    t.fit(model, DataLoader(Augmented(), batch_size=8))
    assert t.strategy.grad_check["spot_checks"] >= 5
    assert model.updates == len(model.losses) == sum(1 for s in sizes.sizes if s > 0)
    assert not t.strategy.checking
    # Fetching the check's examples (with augmentation) leaves the global generators where they were.
    from lightning_dp.mechanism.grads.selection import check_examples

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    check_examples(Augmented(), 8, torch.Generator().manual_seed(0), list, lambda b: (None, torch.zeros(())), None)
    after = (random.getstate(), np.random.get_state()[1], torch.random.get_rng_state())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])
