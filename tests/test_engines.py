"""Exact DP-SGD updates on the architectures Opacus's hooks get wrong, via engine='auto'.

For each model: one private step with noise 0 through a real Trainer, and the parameter
change compared with the clipped sum of brute-force per-example gradients (one backward
pass per example, each on its own loss) over the examples the loop received.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Batches, clipped_sum, snapshot, trainer
from lightning_dp import DPStrategy

VOCAB, T, D = 13, 8, 16


class LM(L.LightningModule):
    """Next-token prediction with a token-level loss over (B*T, V) logits and a
    non-contiguous input slice x[:, :-1]."""

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return h  # each architecture below puts its own layers here

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, VOCAB)

    def loss(self, batch: Any) -> torch.Tensor:
        (x,) = batch
        inp, tgt = x[:, :-1], x[:, 1:]
        logits = self.head(self.body(self.tok(inp)))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class NanoGPT(LM):
    """nanoGPT's position embedding: pos_emb(torch.arange(T)), no batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_emb = nn.Embedding(T, D)
        self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU())

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h + self.pos_emb(torch.arange(h.shape[1], device=h.device)))


class CausalTransformer(LM):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        return self.encoder(h, mask=mask, is_causal=True)


class FullTransformer(LM):
    """nn.Transformer (encoder and decoder) with a causal target mask."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(D, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=32, dropout=0.0, batch_first=True)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        return self.transformer(h, h, src_mask=mask, tgt_mask=mask, memory_mask=mask,
                                src_is_causal=True, tgt_is_causal=True, memory_is_causal=True)


class BufferAndNoGrad(LM):
    """Reads a buffer, and computes part of the step under torch.no_grad (a detached target
    scale), as ordinary training code does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(2.0))
        self.mix = nn.Linear(D, D)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a per-example statistic: a batch-wide one would mix examples
            scale = h.detach().abs().mean(dim=(1, 2), keepdim=True) + 1.0
        return self.mix(h / self.temperature) * scale


class CausalAttention(LM):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, num_heads=2, batch_first=True)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        return self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]


class LSTMLM(LM):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(D, D, batch_first=True)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return self.rnn(h)[0]


class GRULM(LM):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(D, D, batch_first=True)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return self.rnn(h)[0]


class TiedLM(NanoGPT):
    """Input and output embeddings share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.head.weight = self.tok.weight


class InplaceActivation(L.LightningModule):
    """Linear -> ReLU(inplace=True): the layer's output is overwritten after the forward, so
    its gradient must be captured for the version the layer produced (Opacus's hooks crash)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class ConvGroupNorm(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
        )

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class LinearAttentionGPT(LM):
    """A GPT block built from Linear layers, positions with a batch dimension, a padded
    embedding: everything the ghost engine computes without per-example gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        h = h + self.pos(torch.arange(t, device=h.device).expand(b, t))
        q, k, v = self.qkv(self.ln(h)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.proj(y.transpose(1, 2).reshape(b, t, d))


class TiedLinearAttentionGPT(LinearAttentionGPT):
    """Tied input/output embeddings: the shared weight falls back to per-example gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.head.weight = self.tok.weight


def token_data(n: int = 32) -> TensorDataset:
    return TensorDataset(torch.randint(0, VOCAB, (n, T + 1), generator=torch.Generator().manual_seed(1)))


def image_data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


CASES = [
    (NanoGPT, token_data, "functorch"),
    (CausalTransformer, token_data, "functorch"),
    (CausalAttention, token_data, "functorch"),
    (FullTransformer, token_data, "functorch"),
    (BufferAndNoGrad, token_data, "ghost"),
    (LSTMLM, token_data, "functorch"),
    (GRULM, token_data, "loop"),  # vmap has no batching rule that works for nn.GRU
    (TiedLM, token_data, "functorch"),
    (ConvGroupNorm, image_data, "ghost"),
    (InplaceActivation, lambda: __import__("conftest").make_dataset(n=32), "ghost"),
    (LinearAttentionGPT, token_data, "ghost"),
    (TiedLinearAttentionGPT, token_data, "ghost"),
]


@pytest.mark.parametrize("max_physical", [None, 3])
@pytest.mark.parametrize("model_cls, data, engine", CASES, ids=[c[0].__name__ for c in CASES])
def test_auto_engine_gives_the_exact_dp_update(model_cls, data, engine, max_physical) -> None:
    c, b = 0.05, 8  # C small enough that clipping binds
    model = model_cls()
    reference = model_cls()
    reference.load_state_dict(model.state_dict())
    before = snapshot(model)
    rec = Batches()
    t = trainer(max_steps=1, callbacks=[rec],
                strategy=DPStrategy(max_grad_norm=c, noise_multiplier=0.0, max_physical_batch_size=max_physical))
    with pytest.warns(UserWarning, match="NOT differentially private"):
        t.fit(model, DataLoader(data(), batch_size=b, shuffle=True))
    assert t.strategy.engine.name == engine
    examples = [tuple(t_[i : i + 1] for t_ in chunk) for batch in rec.batches for chunk in batch.chunks
                for i in range(len(chunk[0]))]
    assert examples, "the Poisson draw was empty; pick another seed"
    params = [p for p in reference.parameters()]
    grads = [list(torch.autograd.grad(reference.loss(ex), params)) for ex in examples]
    expected = [g / b for g in clipped_sum(grads, c, params)]
    for p0, p, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(p0 - p.detach(), e, rtol=1e-4, atol=1e-6)


def test_auto_engine_explains_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    t = trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0))
    with caplog.at_level("INFO"), pytest.warns(UserWarning):
        t.fit(NanoGPT(), DataLoader(token_data(), batch_size=8, shuffle=True))
    messages = [r.getMessage() for r in caplog.records if "per-sample gradients by" in r.getMessage()]
    assert len(messages) == 1
    assert "'functorch' engine" in messages[0] and "'hooks' passed over" in messages[0] and "pos_emb" in messages[0]


class DropoutLM(NanoGPT):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.Dropout(0.3), nn.GELU())


def test_functorch_engine_trains_with_dropout_and_logs_the_real_batch() -> None:
    logged: list[float] = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(batch[0]):
                logged.append(float(trainer.callback_metrics["train_loss"]))
                assert float(outputs["loss"]) == pytest.approx(logged[-1], rel=1e-6)

    model = DropoutLM()
    t = trainer(max_steps=4, callbacks=[Watch()], strategy=DPStrategy(noise_multiplier=1.0, engine="functorch"))
    with pytest.warns(UserWarning):
        t.fit(model, DataLoader(token_data(), batch_size=8, shuffle=True))
    assert t.global_step == 4 and len(logged) > 0
    assert all(torch.isfinite(torch.tensor(logged)))


class StridedConv(ConvGroupNorm):
    """Stride, dilation and padding through the im2col ghost rule, with a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
            nn.Flatten(), nn.LazyLinear(3),
        )
        self.net(torch.zeros(1, 1, 6, 6))  # materialise the lazy layer


@pytest.mark.parametrize("engine", ["ghost", "hooks"])
def test_conv_ghost_rule_matches_per_example_gradients(engine: str) -> None:
    from lightning_dp.mechanism.grads.ghost import GhostEngine
    from lightning_dp.mechanism.grads.registry import make_engine

    model = StridedConv()
    data = image_data(6)
    batch = (data.tensors[0], data.tensors[1])
    params = [p for p in model.parameters()]
    eng = make_engine(engine)
    eng.attach(model)
    _, _, grads = eng.compute(lambda b: (None, model.loss(b)), batch, params, 6, "mean")
    eng.detach()
    sq_norms = grads.sq_norms()
    for k in range(6):
        ref = torch.autograd.grad(model.loss((batch[0][k : k + 1], batch[1][k : k + 1])), params)
        got = grads.weighted_sum(torch.eye(6)[k])
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert sq_norms[k].item() == pytest.approx(sum((r**2).sum().item() for r in ref), rel=1e-4)
    if engine == "ghost":
        assert isinstance(eng, GhostEngine)
        # The 3x3-output first conv has more positions squared than weights: it takes the
        # per-example path; the second conv and the Linear take the ghost path.
        assert len(grads.linear) == 2 and len(grads.materialized) >= 2


class TwoLinears(nn.Module):
    """A Linear on the data (its input carries no gradient) and one on hidden values (it does),
    with the first one's weight also used directly outside its call."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 3)
        self.direct = direct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        out = self.second(h)
        if self.direct:  # the second layer's weight used outside its call: autograd must see it
            out = out + (h @ self.second.weight.t()) * 0.5
        return out


def test_the_ghost_backward_skips_weight_gradients_it_would_throw_away() -> None:
    from lightning_dp.mechanism.grads.check import PerSampleGradientMismatch
    from lightning_dp.mechanism.grads.ghost import GhostEngine

    torch.manual_seed(0)
    model, x, y = TwoLinears(), torch.randn(4, 5), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    reached = {name: 0 for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: reached.__setitem__(name, reached[name] + 1))
    eng = GhostEngine()
    eng.attach(model)

    def step(b: Any) -> tuple[None, torch.Tensor]:
        return None, nn.functional.cross_entropy(model(b[0]), b[1])

    _, _, grads = eng.compute(step, (x, y), params, 4, "mean")
    # The second layer's input carries a gradient: autograd computed no gradient for its
    # weights; the first layer's weights are the only path to its output's gradient: kept.
    assert reached == {"first.weight": 1, "first.bias": 1, "second.weight": 0, "second.bias": 0}
    assert all(p.requires_grad for p in params) and all(p.grad is None for p in params)
    # ... and every per-example gradient is still exact (one backward pass per example).
    for k in range(4):
        ref = torch.autograd.grad(nn.functional.cross_entropy(model(x[k:k + 1]), y[k:k + 1]), params)
        for got, r in zip(grads.weighted_sum(torch.eye(4)[k]), ref):
            torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-7)

    # A layer that raises inside its call, after its weights were taken out of autograd (a wrong
    # input width), leaves them trainable.
    def failing(b: Any) -> tuple[None, torch.Tensor]:
        return None, model.second(torch.tanh(model.first(b[0]))[:, :4]).sum()

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        eng.compute(failing, (x, y), params, 4, "mean")
    assert all(p.requires_grad for p in params)
    eng.detach()

    # A weight used outside its layer's call as well: that use's gradient is in no record (as
    # before, when autograd's summed gradient was thrown away), so the start-of-fit check, which
    # compares with one backward pass per example, refuses the engine for this model.
    class Direct(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TwoLinears(direct=True)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    with pytest.raises(PerSampleGradientMismatch, match="differ .* net.second.weight"):
        trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, engine="ghost")).fit(
            Direct(), DataLoader(data, batch_size=8))


def _exact_against_one_pass_per_example(model: nn.Module, step: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    from lightning_dp.mechanism.grads.ghost import GhostEngine

    params = [p for p in model.parameters() if p.requires_grad]
    eng = GhostEngine()
    eng.attach(model)
    try:
        _, _, grads = eng.compute(lambda b: (None, step(*b)), (x, y), params, len(x), "mean")
    finally:
        eng.detach()
    assert all(p.requires_grad for p in params) and all(p.grad is None for p in params)
    for k in range(len(x)):
        ref = torch.autograd.grad(step(x[k:k + 1], y[k:k + 1]), params)
        for got, r in zip(grads.weighted_sum(torch.eye(len(x))[k]), ref):
            torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-7)


def test_a_layer_error_caught_in_the_step_leaves_the_layer_trainable_for_its_next_call() -> None:
    # The layer's weights are out of autograd during its call; its error, caught by the user's
    # code (a fallback path), must not leave them so for the fallback's call of the same layer.
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 3)
    model = nn.ModuleDict({"a": a, "b": b})

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(a(x))
        try:
            a(h[..., :5])  # raises inside the call: the wrong width
        except RuntimeError:
            pass
        return nn.functional.cross_entropy(b(h + a(x)).mean(1), y)

    _exact_against_one_pass_per_example(model, step, torch.randn(4, 5, 6), torch.randint(0, 3, (4,)))


def test_a_step_calling_the_model_with_other_weights_through_functional_call() -> None:
    # torch.func.functional_call with non-leaf weights (views of the parameters, as a wrapper that
    # reshapes or casts them makes): those cannot be taken out of autograd, and need not be.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        views = {k: v.view_as(v) for k, v in model.named_parameters()}
        return nn.functional.cross_entropy(torch.func.functional_call(model, views, (x,)), y)

    _exact_against_one_pass_per_example(model, step, torch.randn(4, 5), torch.randint(0, 3, (4,)))


def test_gpt2s_tied_head_under_bf16_autocast_gets_per_example_gradients() -> None:
    # GPT-2's lm_head shares wte's weight (two calls: the per-call rule); under autocast its input
    # (ln_f's output) is float32 and its output gradient bf16.
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_dp.mechanism.grads.ghost import GhostEngine

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=8, resid_pdrop=0,
                                       embd_pdrop=0, attn_pdrop=0)).train()
    tokens = torch.randint(0, 23, (4, 8))

    def step(b: torch.Tensor) -> tuple[None, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=b).logits[:, :-1]
        return None, nn.functional.cross_entropy(logits.reshape(-1, 23).float(), b[:, 1:].reshape(-1))

    eng = GhostEngine()
    eng.attach(model)
    _, _, grads = eng.compute(step, tokens, list(model.parameters()), 4, "mean")
    eng.detach()
    sq = grads.sq_norms()
    assert sq.shape == (4,) and bool(torch.isfinite(sq).all()) and bool((sq > 0).all())


class Norms(nn.Module):
    """LayerNorms of every shape the ghost engine's own LayerNorm rule covers: over the last
    dimension of a sequence, over two dimensions, without a bias, without affine parameters, and
    on a (batch, features) input."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.LayerNorm(4)
        self.two = nn.LayerNorm((3, 4))
        self.no_bias = nn.LayerNorm(4, bias=False)
        self.plain = nn.LayerNorm(4, elementwise_affine=False)
        self.flat = nn.LayerNorm(12)
        for p in self.parameters():  # away from their initial 1 and 0: a wrong rule shows
            nn.init.normal_(p)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.no_bias(self.plain(self.two(self.seq(x)))) * torch.arange(1.0, 5.0)
        return (self.flat(h.flatten(1)) * torch.linspace(-1.0, 2.0, 12)).square().sum()


def test_the_ghost_layer_norm_rule_matches_per_example_gradients() -> None:
    from lightning_dp.mechanism.grads.ghost import GhostEngine

    torch.manual_seed(0)
    model, x = Norms(), torch.randn(5, 3, 4) * 3 + 1
    params = list(model.parameters())
    eng = GhostEngine()
    eng.attach(model)
    _, _, grads = eng.compute(lambda b: (None, model.loss(b)), x, params, 5, "sum")
    eng.detach()
    assert len(grads.materialized) == len(params) == 7  # every LayerNorm parameter: 4 weights, 3 biases
    sq_norms = grads.sq_norms()
    for k in range(5):
        ref = torch.autograd.grad(model.loss(x[k : k + 1]), params)
        for g, r in zip(grads.weighted_sum(torch.eye(5)[k]), ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        assert sq_norms[k].item() == pytest.approx(sum((r**2).sum().item() for r in ref), rel=1e-5)


class Penalised(nn.Module):
    """A step that differentiates through its own layers: a gradient penalty as WGAN-GP writes it
    (torch.autograd.grad with create_graph=True, in the loss), an input gradient only logged
    (saliency: no create_graph, not in the loss), or FGSM adversarial training (the loss on a
    second forward, of an input moved along the first one's gradient)."""

    def __init__(self, norm: bool, extra: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6) if norm else nn.Tanh(), nn.Linear(6, 1))
        self.extra = extra
        self.saliency: list[torch.Tensor] = []

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        out = self.net(x)
        if self.extra == "fgsm":  # train on an adversarial input: a first forward's input gradient
            (direction,) = torch.autograd.grad(out.square().sum(), x)
            return self.net(x.detach() + 0.1 * direction.sign()).square().sum()
        if self.extra == "saliency":
            self.saliency.append(torch.autograd.grad(out.square().sum(), x, retain_graph=True)[0])
        if self.extra != "penalty":
            return out.square().sum()
        (slope,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out.sum() + (slope.norm(dim=1) - 1).square().sum()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("extra", ["penalty", "saliency", "fgsm", "none"])
def test_ghost_refuses_a_step_that_differentiates_through_its_layers_into_the_loss(norm: bool, extra: str) -> None:
    from lightning_dp.mechanism.grads.engine import PerSampleGradientError
    from lightning_dp.mechanism.grads.ghost import GhostEngine

    torch.manual_seed(0)
    model, x = Penalised(norm, extra), torch.randn(5, 4)
    params = list(model.parameters())
    eng = GhostEngine()
    eng.attach(model)
    try:
        if extra == "penalty":
            with pytest.raises(PerSampleGradientError, match="create_graph=True"):
                eng.compute(lambda b: (None, model.loss(b)), x, params, 5, "sum")
            return
        _, _, grads = eng.compute(lambda b: (None, model.loss(b)), x, params, 5, "sum")
    finally:
        eng.detach()
    for k in range(5):  # the step's own gradients without create_graph are not the loss's: exact
        ref = torch.autograd.grad(model.loss(x[k : k + 1]), params)
        for g, r in zip(grads.weighted_sum(torch.eye(5)[k]), ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
