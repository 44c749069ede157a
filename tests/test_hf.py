"""Hugging Face causal LMs (random init from small configs, nothing downloaded) and LoRA
adapters from peft: the exact DP-SGD update through engine='auto'."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import Batches, clipped_sum, snapshot, trainer
from lightning_dp import DPStrategy


from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 50


def gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def llama_lora() -> torch.nn.Module:
    return get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.0, init_lora_weights=False))


class CausalLM(L.LightningModule):
    def __init__(self, build: Callable[[], torch.nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build()

    def loss(self, batch: Any) -> torch.Tensor:
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss  # token-level mean; HF shifts the labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("max_physical", [None, 3])
@pytest.mark.parametrize("build, engine", [(gpt2, "ghost"), (llama, "ghost"), (llama_lora, "ghost")],
                         ids=["gpt2", "llama", "llama-lora"])
def test_hf_causal_lm_gets_the_exact_dp_update(build, engine, max_physical) -> None:
    c, b = 0.05, 8
    model, reference = CausalLM(build), CausalLM(build)
    reference.load_state_dict(model.state_dict())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if build is llama_lora:
        assert trainable and all("lora_" in n for n in trainable)  # the frozen base gets nothing
    before = snapshot(model)
    rec = Batches()
    t = trainer(max_steps=1, callbacks=[rec], strategy=DPStrategy(max_grad_norm=c, noise_multiplier=0.0,
                                                                     max_physical_batch_size=max_physical))
    data = TensorDataset(torch.randint(0, VOCAB, (32, 9), generator=torch.Generator().manual_seed(2)))
    with pytest.warns(UserWarning, match="NOT differentially private"):
        t.fit(model, DataLoader(data, batch_size=b, shuffle=True))
    assert t.strategy.engine.name == engine
    examples = [(chunk[0][i : i + 1],) for batch in rec.batches for chunk in batch.chunks for i in range(len(chunk[0]))]
    assert examples
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = [list(torch.autograd.grad(reference.loss(ex), params)) for ex in examples]
    expected = iter([g / b for g in clipped_sum(grads, c, params)])
    for p0, (name, p) in zip(before, model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p0 - p.detach(), next(expected), rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(p0, p.detach()), f"frozen {name} changed"
