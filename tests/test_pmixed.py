"""PMixED: the per-query bound against the exact output distributions of small ensembles, the
projection, the query budget, members never read when none is sampled, and the ledger charge."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from lightning_dp import PrivacyLedger
from lightning_dp.core.budget import PrivacyBudgetExhausted
from lightning_dp.core.ledger import LedgerRefused
from lightning_dp.core.pmixed_accounting import (
    calibrate_beta,
    default_order,
    dp_from_rdp,
    eps_rdp_from_dp,
    per_query_rdp,
)
from lightning_dp.mechanism.pmixed import PMixED, project_onto_ball


def test_the_budget_round_trips_through_the_rdp_conversion() -> None:
    assert default_order(8.0, 1e-5) == 3
    rdp = eps_rdp_from_dp(8.0, 1e-5, 3)
    assert rdp == pytest.approx(3.198309, abs=1e-6) and dp_from_rdp(rdp, 1e-5, 3) == pytest.approx(8.0, abs=1e-12)
    epsilon = rdp_privacy_accountant.compute_epsilon([3], [rdp], 1e-5)[0]  # dp_accounting, independently
    assert epsilon == pytest.approx(8.0, abs=1e-9)


def _renyi(p: np.ndarray, q: np.ndarray, order: int) -> float:
    return float(np.log(np.sum(p**order * q ** (1 - order))) / (order - 1))


def _output(members: list[np.ndarray], p0: np.ndarray, q: float, beta: float, alpha: int) -> np.ndarray:
    """The exact token distribution of one query: every subset of members, weighted by its
    probability, through the library's own projection."""
    projected = []
    if members:
        lam = project_onto_ball(torch.tensor(np.stack(members)), torch.tensor(p0), beta, alpha).numpy()
        projected = [lam[i] * members[i] + (1 - lam[i]) * p0 for i in range(len(members))]
    out = np.zeros_like(p0)
    for mask in itertools.product([0, 1], repeat=len(members)):
        chosen = [projected[i] for i in range(len(members)) if mask[i]]
        weight = q ** len(chosen) * (1 - q) ** (len(members) - len(chosen))
        out += weight * (np.mean(chosen, axis=0) if chosen else p0)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("q", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("relation", ["replace_one", "add_remove"])
def test_exhaustive_audit_of_four_members_stays_within_the_per_query_budget(q: float, relation: str) -> None:
    alpha, budget = 3, eps_rdp_from_dp(8.0, 1e-5, 3) / 16  # T = 16 queries
    beta = calibrate_beta(budget, q, alpha, relation, n=3 if relation == "replace_one" else None)
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(60):
        p0 = _softmax(rng.normal(size=5) * rng.choice([1.0, 4.0]))
        members = [_softmax(rng.normal(size=5) * rng.choice([1.0, 4.0, 8.0])) for _ in range(4)]
        if trial % 3 == 0:  # adversarial: the changed member is near one-hot where p0 has little mass
            members[-1] = np.full(5, 1e-6)
            members[-1][int(np.argmin(p0))] = 1.0
            members[-1] /= members[-1].sum()
        if trial % 3 == 1:  # the reference rule's counterexample: a public token of tiny mass s that the
            # others avoid and the changed member takes (orders up to alpha alone cannot bound this)
            s = 10.0 ** -rng.integers(4, 12)
            p0 = np.array([s, *([(1 - s) / 4] * 4)])
            avoid = _softmax(rng.normal(size=5))
            avoid[0] = 1e-30
            members = [avoid / avoid.sum()] * 3 + [np.array([1.0 - 4e-12, 1e-12, 1e-12, 1e-12, 1e-12])]
        full = _output(members, p0, q, beta, alpha)
        if relation == "add_remove":
            neighbour = _output(members[:-1], p0, q, beta, alpha)
        else:
            neighbour = _output(members[:-1] + [_softmax(rng.normal(size=5) * 8)], p0, q, beta, alpha)
        worst = max(worst, _renyi(full, neighbour, alpha), _renyi(neighbour, full, alpha))
    assert worst <= budget * (1 + 1e-9)
    assert worst > 0.05 * budget  # not vacuous (the bound's tightness: the next test)


@pytest.mark.parametrize("q", [1e-9, 1e-3])
def test_rare_sampling_calibrates_soundly_and_float_cancellation_is_caught(q: float, monkeypatch) -> None:
    from lightning_dp.core import pmixed_accounting as pa

    alpha, budget = 3, eps_rdp_from_dp(8.0, 1e-5, 3) / 16
    beta = calibrate_beta(budget, q, alpha, "replace_one", n=3)
    assert math.isfinite(beta) and per_query_rdp(beta, q, alpha, "replace_one", n=3) <= budget
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(20):
        p0 = _softmax(rng.normal(size=5) * 4)
        members = [_softmax(rng.normal(size=5) * 8) for _ in range(4)]
        full = _output(members, p0, q, beta, alpha)
        neighbour = _output(members[:-1] + [_softmax(rng.normal(size=5) * 8)], p0, q, beta, alpha)
        worst = max(worst, _renyi(full, neighbour, alpha), _renyi(neighbour, full, alpha))
    assert worst <= budget
    # The sampling terms in plain floats (as first written) cancel at q = 1e-9: the guard refuses the result.
    def floats(n: int, q: float) -> tuple[float, float, float, float, float]:
        u = 1.0 - q
        un, rho = u**n, (1.0 - u ** (n + 1)) / ((n + 1) * q)
        gamma = (rho - un) / (1 - un)
        return un, rho, 1 - un, gamma, rho - gamma

    monkeypatch.setattr(pa, "_sampling", floats)
    if q == 1e-9:
        with pytest.raises(ArithmeticError, match="failed numerically"):
            per_query_rdp(4.0, q, alpha, "replace_one", n=3)


def test_the_bound_is_nearly_attained_by_one_member_at_rate_one() -> None:
    # q = 1, one member: the output is the projection itself, whose order-3 divergence from p0 the
    # ball caps at 3 beta (the higher orders bind a little before it here: 0.71 of the bound).
    alpha, beta = 3, 0.05
    bound = per_query_rdp(beta, 1.0, alpha, "add_remove", n=0)
    p0 = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    member = np.array([1e-9, 1e-9, 1e-9, 1e-9, 1.0 - 4e-9])
    out = _output([member], p0, 1.0, beta, alpha)
    exact = max(_renyi(out, p0, alpha), _renyi(p0, out, alpha))
    assert exact <= bound * (1 + 1e-9) and exact > 0.6 * bound


def test_the_projection_is_feasible_and_maximal() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p0 = torch.tensor(_softmax(rng.normal(size=30) * 3))
        members = torch.tensor(np.stack([_softmax(rng.normal(size=30) * 5) for _ in range(4)]))
        beta = float(rng.uniform(0.01, 0.5))
        lam = project_onto_ball(members, p0, beta, 3)
        for i in range(4):
            for scale, inside in ((1.0, True), (1 + 1e-6, False)):
                w = min(float(lam[i]) * scale, 1.0)
                mixed = (w * members[i] + (1 - w) * p0).numpy()
                ok = all(_renyi(mixed, p0.numpy(), j) <= j * beta * (1 + 1e-9) and
                         _renyi(p0.numpy(), mixed, j) <= j * beta * (1 + 1e-9) for j in range(2, 7))
                if inside or w < 1.0:
                    assert ok == inside or (not inside and lam[i] == 1.0)


class Counting:
    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.eye(5)[self.k] * 3


def test_the_query_budget_is_enforced_and_no_member_is_read_without_being_sampled() -> None:
    members = [Counting(k) for k in range(4)]
    service = PMixED(lambda ids: torch.zeros(5), members, epsilon=8.0, delta=1e-5, query_budget=40,
                     sample_rate=0.1, generator=torch.Generator().manual_seed(3))
    reads = []
    for _ in range(40):
        before = sum(m.calls for m in members)
        dist = service.next_token_distribution(torch.tensor([0]))
        reads.append(sum(m.calls for m in members) - before)
        if reads[-1] == 0:
            assert torch.allclose(dist, torch.full((5,), 0.2, dtype=torch.float64))  # the public answer
    assert 0 in reads and max(reads) >= 1  # some queries sampled no member, and read none
    assert service.epsilon_spent == pytest.approx(8.0, abs=1e-9)
    with pytest.raises(PrivacyBudgetExhausted, match="query budget of 40"):
        service.next_token_distribution(torch.tensor([0]))
    generated = PMixED(lambda ids: torch.zeros(5), members, 8.0, 1e-5, 3, 0.5).generate(torch.tensor([1]), 3)
    assert len(generated) == 4


def test_a_service_reserves_its_budget_in_the_ledger(tmp_path) -> None:
    ledger = PrivacyLedger(str(tmp_path / "l.db"), "plays", epsilon=10.0, delta=1e-5)
    members = [Counting(k) for k in range(4)]
    service = PMixED(lambda ids: torch.zeros(5), members, 8.0, 1e-5, 32, 0.25, ledger=ledger)
    with pytest.raises(LedgerRefused):
        PMixED(lambda ids: torch.zeros(5), members, 8.0, 1e-5, 32, 0.25, ledger=ledger)  # a second one does not fit
    for _ in range(8):
        service.next_token_distribution(torch.tensor([0]))
    service.close()
    (run,) = ledger.runs()
    assert run.kind == "pmixed" and run.steps == 8 and run.status == "finished"
    assert ledger.spent() < 8.0 and math.isfinite(ledger.spent())


def test_train_ensemble_trains_one_member_per_stable_disjoint_partition() -> None:
    import warnings

    from conftest import Classifier, make_dataset

    from lightning_dp.lightning.ensemble import partition_of, train_ensemble

    data = make_dataset(n=60)
    keys = [f"record {i}" for i in range(60)]
    with pytest.warns(UserWarning, match="WITHOUT differential privacy"):
        members = train_ensemble(lambda m: Classifier(lr=0.5), data, 4, batch_size=8, keys=keys,
                                 trainer_kwargs=dict(max_steps=3, accelerator="cpu", enable_progress_bar=False))
    assert len(members) == 4
    seen = [torch.cat([x for x, _ in m.seen]) for m in members]
    rows = [{tuple(r.tolist()) for r in s} for s in seen]
    assert all(not (rows[a] & rows[b]) for a in range(4) for b in range(a + 1, 4))  # disjoint
    assert len({id(p) for m in members for p in m.parameters()}) == 4 * len(list(members[0].parameters()))
    # A record's partition depends on its id alone: adding a record changes one member's data.
    before = [partition_of(k, 4) for k in keys]
    after = [partition_of(k, 4) for k in [*keys[:30], "a new record", *keys[30:]]]
    assert after[:30] + after[31:] == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="empty"):
            train_ensemble(lambda m: Classifier(), make_dataset(n=3), 8)


# ------------------------------------------------------------ members as adapters of one base
def _tiny_lora_members(n: int = 3) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A Llama with the default config but tiny sizes, and ``n`` peft members with distinct
    (non-zero) adapters."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return base, [get_peft_model(copy.deepcopy(base), lora).eval() for _ in range(n)]


def _last(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.reshape(1, -1)).logits[0, -1]


def test_lora_ensemble_answers_like_each_member_across_cached_and_reset_contexts() -> None:
    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble

    base, members = _tiny_lora_members()
    ensemble = LoRAEnsemble(members)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 40, (5,), generator=g)
    contexts = [prompt[:k] for k in range(1, 6)]  # growing, as in generation
    contexts += [prompt[:3], torch.cat([prompt[:2], torch.tensor([7, 8])]), torch.tensor([9]), prompt, prompt]
    rows = [[0, 2], [1], [0, 1, 2], [2], [1, 2], [0], [0, 1], [2], [0]]
    for ids, sampled in zip(contexts, itertools.cycle(rows)):
        public, got = ensemble.logits(ids, sampled)
        assert torch.allclose(public, _last(base, ids), atol=1e-5)
        want = torch.stack([_last(members[i], ids) for i in sampled])
        assert torch.allclose(got, want, atol=1e-5)


def test_an_unsampled_member_never_reaches_the_answer_and_other_bases_are_refused() -> None:
    import copy

    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble

    base, members = _tiny_lora_members()
    ensemble = LoRAEnsemble(members)
    ids = torch.tensor([3, 1, 4, 1, 5])
    before = ensemble.member_logits(ids, [0, 2])
    with torch.no_grad():  # poison member 1's adapter: its row turns NaN, the others must not
        for layer in ensemble._stacked:
            layer.a_t[1].fill_(float("nan"))
    assert torch.isnan(ensemble.member_logits(torch.tensor([2, 7]), [1])).all()  # the check can fail
    after = ensemble.member_logits(ids, [0, 2])
    assert torch.isfinite(after).all() and torch.allclose(before, after, atol=1e-5)
    other = copy.deepcopy(members[1])
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "embed_tokens" in n).add_(0.01)
    with pytest.raises(ValueError, match="base weights differ"):
        LoRAEnsemble([members[0], other])
    with pytest.raises(TypeError, match="not a peft model"):
        LoRAEnsemble([base])


def test_pmixed_over_a_lora_ensemble_equals_pmixed_over_separate_members_and_skips_them_unsampled() -> None:
    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble

    base, members = _tiny_lora_members(4)
    ensemble = LoRAEnsemble(members)
    batched = PMixED(ensemble.public, ensemble, 8.0, 1e-5, 16, 0.5, generator=torch.Generator().manual_seed(5))
    separate = PMixED(lambda ids: _last(base, ids), [lambda ids, m=m: _last(m, ids) for m in members], 8.0, 1e-5, 16,
                      0.5, generator=torch.Generator().manual_seed(5))
    a, b = batched.generate(torch.tensor([1, 2]), 6), separate.generate(torch.tensor([1, 2]), 6)
    assert torch.equal(a, b)
    for k in range(2, len(a) + 1):
        assert torch.allclose(batched.next_token_distribution(a[:k]), separate.next_token_distribution(a[:k]),
                              atol=1e-6)
    # A service whose queries sample no member never runs the members' rows (only batches of one, the public model's).
    rows: list[int] = []
    ensemble = LoRAEnsemble(members)
    ensemble.model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    quiet = PMixED(ensemble.public, ensemble, 8.0, 1e-5, 8, 1e-9, generator=torch.Generator().manual_seed(0))
    quiet.generate(torch.tensor([1]), 8)
    assert rows == [1] * 8
    busy = PMixED(ensemble.public, ensemble, 8.0, 1e-5, 2, 1.0, generator=torch.Generator().manual_seed(0))
    busy.generate(torch.tensor([1]), 2)
    assert rows[8:] == [1, 4, 1, 4]  # the check can fail: sampled members run as one batch of four rows


def test_trainer_predict_generates_through_the_service_and_the_report_covers_it(tmp_path) -> None:
    import json

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dp.lightning.pmixed_module import PMixEDModule, prompts_of
    from lightning_dp.report import PrivacyRecord, build_report, write_report

    members = [Counting(k) for k in range(4)]
    service = PMixED(lambda ids: torch.zeros(5), members, 8.0, 1e-5, 10, 0.5, generator=torch.Generator().manual_seed(2))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    prompts = DataLoader(TensorDataset(torch.tensor([[0, 1], [2, 3], [4, 0]])), batch_size=2)
    out = trainer.predict(PMixEDModule(service, max_new_tokens=3), prompts)
    assert [len(s) for batch in out for s in batch] == [5, 5, 5] and service.queries_used == 9
    second = PMixEDModule(service, max_new_tokens=1)
    with pytest.raises(PrivacyBudgetExhausted):  # the tenth query is the last one in the budget
        trainer.predict(second, prompts)
    assert service.queries_used == 10 and [len(s) for s in second.generated] == [3]  # the paid-for one is kept
    padded = {"input_ids": torch.tensor([[0, 0, 7, 8], [1, 2, 3, 4]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    assert [p.tolist() for p in prompts_of(padded)] == [[7, 8], [1, 2, 3, 4]]
    report = build_report(PrivacyRecord.of_service(service))
    assert report["epsilon"] == pytest.approx(service.epsilon_spent, abs=1e-9) and report["steps"] == 10
    assert report["epsilon"] == pytest.approx(8.0, abs=1e-9) and "partition" in report["privacy_unit"]
    path, _ = write_report(report, tmp_path, history=service.history)
    assert json.loads(path.read_text())["segments"][0]["name"] == "pmixed query"


def test_review_findings_on_the_service_inputs() -> None:
    from lightning_dp.mechanism.lora_ensemble import LoRAEnsemble

    # A batched ensemble that returns every member's row, not only the sampled ones, is refused.
    class Everyone:
        def __len__(self) -> int:
            return 4

        def member_logits(self, ids: torch.Tensor, sampled: list[int]) -> torch.Tensor:
            return torch.eye(5)[:4] * 3

    service = PMixED(lambda ids: torch.zeros(5), Everyone(), 8.0, 1e-5, 4, 0.5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="exactly the sampled members"):
        for _ in range(4):
            service.next_token_distribution(torch.tensor([0]))
    # A token the public model rules out (-inf) leaves the members' weights on the rest intact.
    p0 = torch.tensor([0.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    inside = torch.tensor([[0.0, 0.2, 0.3, 0.5]], dtype=torch.float64)
    outside = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    assert float(project_onto_ball(inside, p0, 0.05, 3)[0]) > 0.1
    assert float(project_onto_ball(outside, p0, 0.05, 3)[0]) == 0.0
    # A forward that fails half-way leaves no stale cache behind.
    base, members = _tiny_lora_members(2)
    ensemble = LoRAEnsemble(members)
    ids = torch.tensor([1, 2, 3, 4])
    ensemble.member_logits(ids[:3], [0])
    hook = ensemble.model.model.layers[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        ensemble.member_logits(ids, [0, 1])
    hook.remove()
    want = torch.stack([_last(m, ids) for m in members])
    assert torch.allclose(ensemble.member_logits(ids, [0, 1]), want, atol=1e-5)
    # Calibration at vanishing sample rates stays sound (1 - q no longer rounds to 1).
    tiny = calibrate_beta(1e-3, 1e-60, 3, "replace_one", n=0)
    assert 0 < per_query_rdp(tiny, 1e-60, 3, "replace_one", n=0) <= 1e-3  # it was 0 (rho rounded to 0) before
