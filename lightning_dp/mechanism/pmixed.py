"""Private next-token prediction without DP training: the PMixED mechanism as a service.

An ensemble of members, each fine-tuned **non-privately** on its own disjoint partition of the
private data (their weights must never leave the service: they are not private), and a public
model answer next-token queries. Each query samples members with rate ``q``, projects each
sampled member's distribution onto a Renyi ball around the public one by mixing, averages, and
samples one token; with no member sampled, no member is read and the public model answers. The
sampled token is differentially private for the partitions; the privacy unit is one partition
(every record in it is protected as a group): see :mod:`lightning_dp.core.pmixed_accounting` for
the rule, why the reference implementation's is not sound, and the bound.

Example:
    >>> import torch
    >>> public = lambda ids: torch.zeros(5)                       # uniform over 5 tokens
    >>> members = [lambda ids, k=k: torch.eye(5)[k] * 4 for k in range(4)]
    >>> service = PMixED(public, members, epsilon=8.0, delta=1e-5, query_budget=16, sample_rate=0.5,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> round(service.next_token_distribution(torch.tensor([1, 2])).sum().item(), 9)
    1.0
    >>> service.queries_used, 0 < service.epsilon_spent < 8.0
    (1, True)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from lightning_dp.core.budget import PrivacyBudgetExhausted
from lightning_dp.core.events import RenyiCharge
from lightning_dp.core.pmixed_accounting import calibrate_beta, default_order, dp_from_rdp, eps_rdp_from_dp

__all__ = ["BatchedMembers", "PMixED", "project_onto_ball"]

#: A model: token ids of the context to next-token logits (or a distribution, see ``logits``).
Model = Callable[[Tensor], Tensor]


class BatchedMembers(Protocol):
    """Members answered together (:class:`~lightning_dp.mechanism.lora_ensemble.LoRAEnsemble`)."""

    def __len__(self) -> int: ...

    def member_logits(self, ids: Tensor, sampled: Sequence[int]) -> Tensor:
        """The next-token outputs of the members ``sampled``, one row each; no other member's
        output may reach them."""
        ...


def _within(lam: Tensor, members: Tensor, p0: Tensor, log_p0: Tensor, orders: range, beta: float) -> Tensor:
    """Whether each ``lam p_i + (1 - lam) p0`` satisfies every constraint of the ball."""
    mixed = lam[:, None] * members + (1 - lam[:, None]) * p0[None, :]
    log_mixed = torch.log(mixed)
    ok = torch.ones_like(lam, dtype=torch.bool)
    for j in orders:
        forward = torch.logsumexp(j * log_mixed + (1 - j) * log_p0[None, :], dim=1)
        reverse = torch.nan_to_num(torch.logsumexp(j * log_p0[None, :] + (1 - j) * log_mixed, dim=1), nan=math.inf)
        ok &= (forward <= (j - 1) * j * beta) & (reverse <= (j - 1) * j * beta)
    return ok


def _within_fast(lam: Tensor, d: Tensor, mu: Tensor, p0: Tensor, limits: Tensor, binomials: Tensor) -> Tensor:
    """:func:`_within` without a logarithm or exponential per order, from the ratio
    ``r = mixed / p0 = 1 + lam d`` (``d = p / p0 - 1``). Forward: ``sum p0 r^j`` is a polynomial
    in ``lam`` whose coefficients are the moments ``mu[k] = sum p0 d^k`` (computed once per
    query), so it costs nothing per step; reverse: ``sum p0 r^(1-j)`` by repeated multiplication.
    (The projection's cost per query at a 49k vocabulary fell from ~0.2 s.) An overflow gives
    ``inf``, which reads as infeasible; :func:`project_onto_ball` confirms the answer with the
    log-space :func:`_within`; ``limits`` (the moments' bounds per order, a little inside the exact
    boundary so that rounding rarely makes the two checks disagree there) and ``binomials``
    (``comb(j, k)``) come from :func:`_fast_constants`."""
    inv = 1.0 / (1.0 + lam[:, None] * d)
    powers = lam[:, None] ** torch.arange(mu.shape[1], dtype=lam.dtype, device=lam.device)[None, :]
    ok = ((powers * mu) @ binomials.T <= limits[None, :]).all(dim=1)  # every forward order at once
    down = inv
    for limit in limits:
        ok &= down @ p0 <= limit
        down = down * inv
    return ok


def _fast_constants(orders: range, beta: float, like: Tensor, slack: float = 1e-9) -> tuple[Tensor, Tensor]:
    limits = torch.tensor([math.exp(min((j - 1) * j * beta, 700.0)) * (1.0 - slack) for j in orders],
                          dtype=like.dtype, device=like.device)
    binomials = torch.tensor([[math.comb(j, k) for k in range(orders[-1] + 1)] for j in orders],
                             dtype=like.dtype, device=like.device)  # (orders, K); comb(j, k) = 0 for k > j
    return limits, binomials


@torch.no_grad()
def project_onto_ball(members: Tensor, p0: Tensor, beta: float, alpha: int, steps: int = 40) -> Tensor:
    """For each row ``p_i`` of ``members`` (``(m, V)`` distributions), the largest ``lam_i`` in
    ``[0, 1]`` (to ``2^-steps``) such that ``lam_i p_i + (1 - lam_i) p0`` lies in
    ``{p : D_j(p || p0) <= j beta and D_j(p0 || p) <= j beta, j = 2..2 alpha}``. Each constraint
    grows with ``lam`` (it is convex and smallest at 0), so the feasible weights are an interval
    ``[0, lam*]``; the bisection keeps its lower end feasible and returns it: never an infeasible
    point (the answer is confirmed in log space, and halved until it is, which rounding alone could
    need). In float64. Tokens where ``p0`` is 0 are left out (a member with mass there gets
    ``lam = 0``)."""
    members, p0 = members.to(torch.float64), p0.to(torch.float64)
    support = p0 > 0
    if not bool(support.all()):
        # Tokens the public model rules out (a -inf logit): a member with mass there is infinitely far
        # (weight 0); the others are projected on the public support, where all their mass is.
        outside = (members[:, ~support] > 0).any(dim=1)
        lam = torch.zeros(members.shape[0], dtype=torch.float64, device=members.device)
        if bool((~outside).any()):
            lam[~outside] = project_onto_ball(members[~outside][:, support], p0[support], beta, alpha, steps)
        return lam
    log_p0 = torch.log(p0)
    orders = range(2, 2 * alpha + 1)
    d = members / p0[None, :] - 1.0
    mu = torch.stack([p0 @ (d.T ** k) for k in range(2 * alpha + 1)], dim=1)  # (m, 2 alpha + 1)
    fast = bool(torch.isfinite(mu).all())  # else (a huge ratio at a high order) the slow check decides
    limits, binomials = _fast_constants(orders, beta, members)
    one = torch.ones(members.shape[0], dtype=torch.float64, device=members.device)
    lo, hi = torch.zeros_like(one), one.clone()
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if fast:
            ok = _within_fast(mid, d, mu, p0, limits, binomials)
        else:
            ok = _within(mid, members, p0, log_p0, orders, beta)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    at_one = _within_fast(one, d, mu, p0, limits, binomials) if fast else torch.ones_like(one, dtype=torch.bool)
    if bool(at_one.any()):
        at_one &= _within(one, members, p0, log_p0, orders, beta)
    lam = torch.where(at_one, one, lo)
    ok = _within(lam, members, p0, log_p0, orders, beta)
    if bool(ok.all()):
        return lam
    # Rounding put a fast answer outside: bisect those rows again, in log space, below it.
    lo, hi = torch.zeros_like(one), lam
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        inside = _within(mid, members, p0, log_p0, orders, beta)
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    return torch.where(ok, lam, lo)


class PMixED:
    """A private next-token service: one query per generated token, within a query budget.

    Args:
        public: the public model (context token ids to next-token logits).
        members: one model per disjoint partition of the private data, fine-tuned non-privately
            (only sampled members are called), or a
            :class:`~lightning_dp.mechanism.lora_ensemble.LoRAEnsemble` (LoRA adapters of one base,
            run as one batch with key-value caches; pass its ``public`` as ``public``).
        epsilon: the service's total epsilon over ``query_budget`` queries.
        delta: its delta.
        query_budget: the number of queries ``T`` (tokens) the budget covers; the next is refused.
        sample_rate: ``q``, the rate each member is sampled with per query.
        alpha: the Renyi order (``None``: the reference's ``ceil(4 log(1/delta) / (3 eps) + 1)``).
        relation: ``"replace_one"`` (default: any change of the data inside one partition, the
            number of members public) or ``"add_remove"`` (one partition present or absent).
        logits: ``True`` if the models return logits (a softmax is applied), ``False`` for
            probabilities.
        ledger: a :class:`~lightning_dp.PrivacyLedger` of the dataset the partitions come from:
            the whole budget is reserved there when the service starts; :meth:`close` commits
            the queries used and frees the rest.
        generator: the random source for the member sampling and the tokens; ``None``: seeded
            from OS entropy (for tests only).
    """

    def __init__(
        self,
        public: Model,
        members: Union[Sequence[Model], BatchedMembers],
        epsilon: float,
        delta: float,
        query_budget: int,
        sample_rate: float,
        alpha: Optional[int] = None,
        relation: str = "replace_one",
        logits: bool = True,
        ledger: Any = None,
        name: str = "pmixed",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not members:
            raise ValueError("PMixED needs at least one member model.")
        if not (isinstance(query_budget, int) and query_budget >= 1):
            raise ValueError(f"query_budget must be an int >= 1, got {query_budget!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not (epsilon > 0 and math.isfinite(epsilon)) or not 0 < delta < 1:
            raise ValueError(f"epsilon must be finite and > 0 and delta in (0, 1), got {epsilon!r}, {delta!r}")
        self.public = public
        #: A batched ensemble (``member_logits(ids, sampled)``) or the list of member callables.
        self.batched: Optional[BatchedMembers] = members if hasattr(members, "member_logits") else None  # type: ignore[assignment]
        self.members: list[Any] = list(range(len(members))) if self.batched is not None else list(members)  # type: ignore[arg-type]
        self.epsilon, self.delta, self.query_budget = float(epsilon), float(delta), query_budget
        self.sample_rate, self.relation, self.logits = float(sample_rate), relation, logits
        self.alpha = int(alpha) if alpha is not None else default_order(self.epsilon, self.delta)
        if self.alpha < 2:
            raise ValueError(f"alpha must be an integer >= 2, got {alpha!r}")
        self.per_query = eps_rdp_from_dp(self.epsilon, self.delta, self.alpha) / query_budget
        if self.per_query <= 0:
            raise ValueError(f"({epsilon}, {delta}) leaves no Renyi budget at order {self.alpha}: raise epsilon or alpha.")
        n_others = None if relation == "add_remove" else len(self.members) - 1
        #: The ball's radius: fixed by the budget, never by the data or the members sampled.
        self.beta = calibrate_beta(self.per_query, self.sample_rate, self.alpha, relation, n=n_others)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        self.queries_used = 0
        #: The privacy unit, for the report: PMixED protects a partition, not a single record.
        self.privacy_unit = "one partition of the private data (every record in it together)"
        self.ledger, self._run = ledger, None
        if ledger is not None:
            self._run = ledger.reserve(ledger.curve_of([self._charge(query_budget)]), name=name, kind="pmixed")

    def _charge(self, queries: int) -> Any:
        from lightning_dp.core.history import Entry

        return Entry(RenyiCharge((float(self.alpha),), (self.per_query,), "pmixed query"), queries)

    @property
    def history(self) -> Any:
        """The queries answered, as a :class:`~lightning_dp.core.history.PrivacyHistory` (one
        Renyi charge per query): what the privacy report and the ledger compose."""
        from lightning_dp.core.history import PrivacyHistory

        return PrivacyHistory([self._charge(self.queries_used)] if self.queries_used else [])

    @property
    def epsilon_spent(self) -> float:
        """Epsilon at ``delta`` of the queries answered (adaptive RDP composition at ``alpha``)."""
        if self.queries_used == 0:
            return 0.0
        return max(dp_from_rdp(self.queries_used * self.per_query, self.delta, self.alpha), 0.0)

    def _distribution(self, model: Model, ids: Tensor) -> Tensor:
        out = model(ids).detach().to(torch.float64).reshape(-1)
        return torch.softmax(out, dim=0) if self.logits else out / out.sum()

    @torch.no_grad()
    def next_token_distribution(self, ids: Tensor) -> Tensor:
        """One query: the mixed next-token distribution for the context ``ids``."""
        if self.queries_used >= self.query_budget:
            raise PrivacyBudgetExhausted(
                f"PMixED: the query budget of {self.query_budget} queries (epsilon {self.epsilon:g}, delta "
                f"{self.delta:g}) is spent; answering more would exceed it."
            )
        self.queries_used += 1
        p0 = self._distribution(self.public, ids)
        sampled = (torch.rand(len(self.members), generator=self.generator) < self.sample_rate).nonzero().flatten()
        if len(sampled) == 0:
            return p0  # no member is read
        if self.batched is not None:
            out = self.batched.member_logits(ids, sampled.tolist()).detach().to(torch.float64)
            if out.shape[0] != len(sampled):
                # Rows of unsampled members would enter the answer: the bound's subsampling would be lost.
                raise RuntimeError(f"member_logits returned {out.shape[0]} rows for {len(sampled)} sampled members: it "
                                   "must return exactly the sampled members' rows, in order.")
            stacked = torch.softmax(out, dim=1) if self.logits else out / out.sum(dim=1, keepdim=True)
        else:
            stacked = torch.stack([self._distribution(self.members[i], ids) for i in sampled.tolist()])
        lam = project_onto_ball(stacked, p0, self.beta, self.alpha)
        return (lam[:, None] * stacked + (1 - lam[:, None]) * p0[None, :]).mean(dim=0)

    def generate(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        """``prompt_ids`` followed by ``max_new_tokens`` sampled tokens (one query each)."""
        ids = prompt_ids.reshape(-1).clone()
        for _ in range(max_new_tokens):
            token = torch.multinomial(self.next_token_distribution(ids).float(), 1, generator=self.generator)
            ids = torch.cat([ids, token.to(ids.dtype)])
        return ids

    def close(self) -> None:
        """Commit the queries used to the ledger and free the rest of the reservation."""
        if self.ledger is not None and self._run is not None:
            self.ledger.commit(self._run, self.ledger.curve_of([self._charge(self.queries_used)]),
                               epsilon=self.epsilon_spent, steps=self.queries_used)
            self.ledger.release(self._run)
            self._run = None
