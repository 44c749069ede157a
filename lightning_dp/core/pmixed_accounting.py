"""The privacy of one PMixED query, and the projection radius that fits a query budget.

PMixED (Flemings, Razaviyayn and Annavaram, NAACL 2024) answers a next-token query from an
ensemble of models fine-tuned *non-privately* on disjoint partitions of the private data: each
member is sampled with rate ``q``, each sampled member's next-token distribution is mixed with a
public model's ``p0`` until it lies in a Renyi ball around ``p0``, the mixtures are averaged and
one token is sampled. The reference code's rule is **not sound**: an exact audit (enumerating
every member subset of a small ensemble for neighbouring datasets) finds per-query Renyi
divergences up to 1.45x its budget at small ``q`` and thousands of times at ``q = 1``, because
its projection constrains only the order ``alpha`` while its bound uses lower orders and
pairwise divergences, and its radius follows the realised number of sampled members.

The rule used here ("all-orders ball, fixed beta"):

* ``K_beta = {p : D_j(p || p0) <= j beta and D_j(p0 || p) <= j beta for j = 2..2 alpha}``;
* every sampled member is projected onto ``K_beta`` by mixing with ``p0`` (the largest feasible
  weight; never an infeasible point);
* ``beta`` is one constant per service, independent of the realised number of sampled members,
  of the data and of the ensemble size; with no member sampled the answer is ``p0``.

:func:`per_query_rdp` bounds ``max(D_alpha(P || P'), D_alpha(P' || P))`` of one query's token
distribution for neighbouring ensembles (``"add_remove"``: one partition present or absent, the
supremum over ensemble sizes; ``"replace_one"``: one partition's data changed arbitrarily, the
ensemble size public). The bound rests on joint convexity of ``M_k(P||Q) = sum P^k Q^(1-k)``,
Hoelder's inequality between members of the ball (``D_k(X || Y) <= 4 k beta`` for ``X, Y`` in
``K_beta``, which needs the orders up to ``2 alpha``), the binomial expansion of a subsampled
mixture (Mironov, Talwar and Zhang 2019) and moment bounds; the derivation, and exact audits
that never exceed it, are in the project's design notes (``pmixed.md``), and
``tests/test_pmixed.py`` audits it exhaustively on small ensembles. Queries compose adaptively
in Renyi DP at order ``alpha`` (Mironov 2017), and the total converts to ``(epsilon, delta)``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import mpmath
import numpy as np

__all__ = ["calibrate_beta", "default_order", "dp_from_rdp", "eps_rdp_from_dp", "per_query_rdp"]

Orders = Union[int, tuple[int, int]]


def eps_rdp_from_dp(epsilon: float, delta: float, alpha: float) -> float:
    """The RDP at order ``alpha`` that converts to ``(epsilon, delta)`` (the inverse of
    :func:`dp_from_rdp`).

    Example:
        >>> round(eps_rdp_from_dp(8.0, 1e-5, 3), 6)
        3.198309
    """
    return epsilon - math.log((alpha - 1) / alpha) + (math.log(delta) + math.log(alpha)) / (alpha - 1)


def dp_from_rdp(rdp: float, delta: float, alpha: float) -> float:
    """Epsilon at ``delta`` of ``(alpha, rdp)``-RDP (Balle et al. 2020, Theorem 21; the
    conversion Opacus and dp_accounting use)."""
    return rdp + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)


def default_order(epsilon: float, delta: float) -> int:
    """The reference's default order ``ceil(4 log(1/delta) / (3 epsilon) + 1)`` (3 at (8, 1e-5))."""
    return int(math.ceil(4 * math.log(1 / delta) / (3 * epsilon) + 1))


# ---------------------------------------------------------------- ball constants -----------------
def log_a(j: int, beta: float) -> float:
    """log M_j(X||p0) and log M_j(p0||X) bound for X in K_beta:  (j-1) * j*beta."""
    return (j - 1) * j * beta


def _JJ(J: Orders) -> tuple[int, int]:
    """J = int (forward and reverse orders 2..J) or (JF, JR) (forward 2..JF, reverse 2..JR)."""
    return (J, J) if isinstance(J, int) else (int(J[0]), int(J[1]))


def log_b(k: int, beta: float, J: Orders) -> float:
    """Bound on log M_k(X||Y) for any X, Y in K_beta (Y may be any convex combination of K_beta points).

    Hoelder with exponents s = j/k, t = j/(j-k) on  M_k(X||Y) = E_p0[(X/p0)^k (p0/Y)^(k-1)]:
        log M_k(X||Y) <= (1/s) log M_j(X||p0) + (1/t) log M_i(p0||Y),   i = (k-1) t + 1,
    with the forward order j <= JF and the reverse order ceil(i) <= JR (D_i is nondecreasing in the order, so a
    non-integer i is rounded up).  Minimise over integer j.  (Valid for X, Y in either role since K constrains
    both directions at every listed order.)"""
    JF, JR = _JJ(J)
    best = math.inf
    for j in range(k + 1, JF + 1):
        i_real = (k - 1) * j / (j - k) + 1
        i = int(math.ceil(i_real - 1e-12))
        if i > JR:
            continue
        val = (k / j) * (j - 1) * j * beta + ((j - k) / j) * (i_real - 1) * i * beta
        best = min(best, val)
    return best


def poly_pos_coeffs(k: int) -> dict[int, float]:
    """Positive coefficients c_j (j>=2) of (x-1)^2 (x+1)^(k-2); |x-1|^k <= that polynomial for x >= 0."""
    c = np.polynomial.polynomial.polymul([1, -2, 1], np.polynomial.polynomial.polypow([1, 1], k - 2))
    return {j: float(c[j]) for j in range(2, len(c)) if c[j] > 0}


def abs_moment_bound(k: int, M: dict[int, float]) -> float:
    """Upper bound on E_mu[|L-1|^k] given E_mu[L]=1 and 1 <= E_mu[L^j] <= M[j] (j>=2)."""
    return sum(c * (M[j] - 1.0) for j, c in poly_pos_coeffs(k).items())


# ---------------------------------------------------------------- per-n bounds -------------------
def _rho_u(n: int, q: float) -> tuple[float, float]:
    """u^n (probability that none of the n others is sampled) and rho_n = E[1/(1+Bin(n,q))]."""
    return _sampling(n, q)[:2]


@functools.lru_cache(maxsize=65536)
def _sampling(n: int, q: float) -> tuple[float, float, float, float, float]:
    """``(u^n, rho_n, 1 - u^n, gamma = (rho_n - u^n) / (1 - u^n), rho_n - gamma)`` with ``u = 1 - q``, each correct to
    float precision. In floats, ``rho_n - u^n`` and ``1 - u^n`` cancel catastrophically at small
    ``q`` (at q = 1e-9 the ratio came out above 1, a factor ``(1 - gamma)^odd`` turned negative and
    the "bound" on a moment that is at least 1 was -1.6e13), so they are computed with 50 digits."""
    if q >= 1.0:
        return (1.0 if n == 0 else 0.0), 1.0 / (n + 1), (0.0 if n == 0 else 1.0), 1.0 / (n + 1), 0.0
    # 50 digits beyond q's own scale: 1 - q must not round to 1 (it did below q ~ 1e-50 at 50 digits).
    with mpmath.workdps(50 + max(0, int(-math.log10(q)))):
        qq = mpmath.mpf(q)
        u = 1 - qq
        un = u ** n
        rho = (1 - u ** (n + 1)) / ((n + 1) * qq)
        gamma = (rho - un) / (1 - un) if n > 0 else mpmath.mpf(0)
        return float(un), float(rho), float(1 - un), float(gamma), float(rho - gamma)


def _mj(j: int, beta: float, J: Orders) -> float:
    """m_j >= E_Y|X/Y - 1|^j for X, Y in K_beta (uses M_i(X||Y) <= b_i)."""
    return abs_moment_bound(j, {i: math.exp(log_b(i, beta, J)) for i in range(2, j + 1)})


def _ej(j: int, beta: float) -> float:
    """e_j >= E_p0|X/p0 - 1|^j and E_Y|p0/Y - 1|^j for X, Y in K_beta (uses M_i <= a_i)."""
    return abs_moment_bound(j, {i: math.exp(log_a(i, beta)) for i in range(2, j + 1)})


def _GH(n: int, q: float, beta: float, alpha: int, J: Orders, tail: bool = False) -> tuple[dict[int, float], dict[int, float]]:
    """Bounds G_k >= M_k(R||mu0) and H_k >= M_k(mu0||R), k = 2..alpha, for n other members.
    tail=True: bounds valid simultaneously for every n' >= n (used for the supremum over n)."""
    un, rho, one_minus_un, gamma, rho_minus_gamma = _sampling(n, q)
    u = 1.0 - q
    G: dict[int, float] = {0: 1.0, 1: 1.0}
    H: dict[int, float] = {0: 1.0, 1: 1.0}
    if n == 0 and not tail:                      # R = B, mu0 = p0
        for k in range(2, alpha + 1):
            G[k] = H[k] = math.exp(log_a(k, beta))
        return G, H
    theta = 0.0 if tail else min(1.0, un / rho)
    if q >= 1.0:
        gam, c_pair = rho, 0.0        # u^n = 0 for n >= 1
    elif tail:
        gam = rho                                # gamma <= rho
        c_pair = un / one_minus_un               # (rho-gamma) <= u^n/(1-u^n), decreasing in n
    else:
        gam, c_pair = gamma, rho_minus_gamma
    for k in range(2, alpha + 1):
        la, lb = log_a(k, beta), log_b(k, beta, J)
        # (c1)/(c2): pairing (1-rho)A <-> (1-rho)A, rho B <-> rho Z, Z = theta p0 + (1-theta) A
        c1 = math.exp(theta * la + (1 - theta) * lb)                      # AM-GM + Hoelder
        c2 = math.exp((1 - k) * math.log(theta) + la) if theta > 0 else math.inf   # Z >= theta p0
        g12 = (1 - rho) + rho * min(c1, c2)
        h12 = (1 - rho) + rho * (theta * math.exp(la) + (1 - theta) * math.exp(lb))
        # (c3): expansion around mu0:  R/mu0 - 1 = gam (B/mu0 - 1) + (rho-gam)(B - p0)/mu0, Minkowski
        g3, h3 = 1.0, 1.0
        for j in range(2, k + 1):
            mj, ej = _mj(j, beta, J) ** (1 / j), _ej(j, beta) ** (1 / j)
            if q >= 1.0:
                w = 0.0
            elif tail:
                w = min(u ** (n / j) * ej / one_minus_un, c_pair * (mj + ej))
            else:
                w = min(c_pair * un ** (-(j - 1) / j) * ej, c_pair * (mj + ej))
            g3 += math.comb(k, j) * (gam * mj + w) ** j
            # reverse: mu0/R - 1 = -[gam (B - mu0) + (rho-gam)(B - p0)]/R, norms in L^j(R), R in K
            h3 += math.comb(k, j) * (gam * 2 * mj + c_pair * (mj + ej)) ** j
        # (c4): R = (1-c)[(1-gam)A + gam B] + c B,  mu0 = (1-c) A + c p0,  c = u^n  (joint convexity),
        #       and the inner pair is a 'subsampled' pair with rate gam: exact binomial expansion with
        #       M_j(B||A) <= b_j (forward) / Lemma-6 style expansion (reverse).
        if q >= 1.0:
            cc = 0.0
        else:
            cc = un                                    # tail: u^n' <= u^n and gam <= rho below
        gg = rho if tail else gam
        bj = {j: math.exp(log_b(j, beta, J)) for j in range(2, k + 1)}
        bj[0] = bj[1] = 1.0
        S = sum(math.comb(k, j) * (1 - gg) ** (k - j) * gg ** j * bj[j] for j in range(0, k + 1))
        g4 = (S + cc * math.exp(la)) if tail else ((1 - cc) * S + cc * math.exp(la))
        Sr = 1.0
        for j in range(2, k + 1):
            E = abs_moment_bound(j, bj)                # both E_A|B/A-1|^j and E_B|A/B-1|^j
            cands = [(1 - gg) * E + gg * E]
            if gg < 1:
                cands.append((1 - gg) ** (1 - j) * E)
            Sr += math.comb(k, j) * gg ** j * min(cands)
        Sr = min(Sr, (1 - gg) + gg * bj[k])
        h4 = (Sr + cc * math.exp(la)) if tail else ((1 - cc) * Sr + cc * math.exp(la))
        G[k] = min(g12, g3, g4)
        H[k] = min(h12, h3, h4)
    # A moment M_k is at least 1: a smaller (or NaN) "bound" is a numerical failure, never a valid bound.
    if not all(v >= 1.0 - 1e-9 for v in (*G.values(), *H.values())):
        raise ArithmeticError(f"PMixED bound failed numerically at n={n}, q={q!r}, beta={beta!r}: moments {G}, {H}")
    return G, H


def _log_add_remove(n: int, q: float, beta: float, alpha: int, J: Orders, tail: bool = False) -> float:
    """log of the bound on max(M_a(P_{D+x}||P_D), M_a(P_D||P_{D+x}))."""
    G, H = _GH(n, q, beta, alpha, J, tail)
    a = alpha
    # remove direction: exact binomial expansion (Mironov et al. 2019), M_k(R||mu0) <= G_k
    # Everything below is computed minus 1 and returned through log1p: at tiny q the bound is
    # 1 + (something below float resolution), and 1.0 would read as a bound of exactly 0.
    if q < 1:  # sum_k C(a,k) (1-q)^(a-k) q^k G_k  minus 1 (the binomial weights sum to 1; G_0 = G_1 = 1)
        s1 = sum(math.comb(a, k) * (1 - q) ** (a - k) * q ** k * (G[k] - 1) for k in range(2, a + 1))
    else:
        s1 = G[a] - 1
    s1 = min(s1, q * (G[a] - 1))                            # joint convexity
    # add direction
    t_lin1 = q * (H[a] - 1)                                 # convexity in the second argument
    t_exp1 = 0.0
    for k in range(2, a + 1):
        E1 = abs_moment_bound(k, G)                          # E_mu0 |R/mu0 - 1|^k
        E2 = abs_moment_bound(k, H)                          # E_R  |mu0/R - 1|^k
        cands = [(1 - q) * E1 + q * E2]                      # mu^(1-k) <= (1-q) mu0^(1-k) + q R^(1-k)
        if q < 1:
            cands.append((1 - q) ** (1 - k) * E1)            # mu >= (1-q) mu0
        t_exp1 += math.comb(a, k) * q ** k * min(cands)
    return math.log1p(max(s1, min(t_lin1, t_exp1)))


def _log_replace(n: int, q: float, beta: float, alpha: int, J: Orders, tail: bool = False) -> float:
    """log of the bound on M_a(P_D||P_D') when the member B is replaced by B' (symmetric)."""
    G, _ = _GH(n, q, beta, alpha, J, tail)
    a = alpha
    _, rho = _rho_u(n, q)                     # rho is decreasing in n: valid for the tail too
    # M_j(R_B||R_B'): pairing (linear in rho) or expansion R_B/R_B' - 1 = rho (B - B')/R_B' (R_B' in K)
    F: dict[int, float] = {}
    for j in range(2, a + 1):
        f_exp = 1.0 + sum(math.comb(j, l) * (rho * 2 * _mj(l, beta, J) ** (1 / l)) ** l for l in range(2, j + 1))
        F[j] = min((1 - rho) + rho * math.exp(log_b(j, beta, J)), f_exp)
    t_lin1 = q * rho * math.expm1(log_b(a, beta, J))        # minus 1, as in _log_add_remove
    t_exp1 = 0.0
    for k in range(2, a + 1):
        E1 = 2 ** k * abs_moment_bound(k, G)                 # E_mu0 |L_B - L_B'|^k <= 2^(k-1)(...+...)
        E3 = abs_moment_bound(k, F)                          # E_RB' |R_B/R_B' - 1|^k
        cands = [(1 - q) * E1 + q * E3]
        if q < 1:
            cands.append((1 - q) ** (1 - k) * E1)
        t_exp1 += math.comb(a, k) * q ** k * min(cands)
    return math.log1p(min(t_lin1, t_exp1))


def per_query_rdp(beta: float, q: float, alpha: int, relation: str = "add_remove",
                  n: Optional[int] = None, J: Optional[Orders] = None) -> float:
    """Upper bound on the per-query order-alpha RDP (both directions).  n = number of other members
    (None: sup over all n >= 0, with a rigorous tail argument: the bound is nondecreasing in rho_n, and
    replacing (u^n, rho_n) by (0, rho_n) only increases it; rho_n decreases in n)."""
    if relation not in ("add_remove", "replace_one"):
        raise ValueError(f"relation must be 'add_remove' or 'replace_one', got {relation!r}")
    J = J if J is not None else 2 * alpha
    f = _log_add_remove if relation == "add_remove" else _log_replace
    if n is not None:
        return f(n, q, beta, alpha, J) / (alpha - 1)
    return per_query_rdp_sup(beta, q, alpha, relation, J)


def per_query_rdp_sup(beta: float, q: float, alpha: int, relation: str = "add_remove", J: Optional[Orders] = None) -> float:
    """Supremum over n >= 0 of the per-n bound.  Rigorous: for n < 200 every n is evaluated; beyond, on
    geometric strides [n, 1.05n) the tail bound (valid for all n' >= n) is used; stop once the tail bound
    from the current n is <= the running maximum."""
    J = J if J is not None else 2 * alpha
    f = _log_add_remove if relation == "add_remove" else _log_replace
    best = -math.inf
    n = 0
    while True:
        if n < 200:
            best = max(best, f(n, q, beta, alpha, J))
            n += 1
        else:
            best = max(best, f(n, q, beta, alpha, J, tail=True))
            n = int(n * 1.05) + 1
        if f(n, q, beta, alpha, J, tail=True) <= best:
            break
        if n > 10 ** 8:
            raise RuntimeError("tail did not converge")
    return best / (alpha - 1)


def calibrate_beta(eps_q: float, q: float, alpha: int, relation: str = "add_remove",
                   n: Optional[int] = None, J: Optional[Orders] = None) -> float:
    """Largest beta (bisection, always returning a feasible beta) with per-query bound <= eps_q."""
    def bound(b: float) -> float:
        try:
            if n is None:
                return per_query_rdp_sup(b, q, alpha, relation, J)
            return per_query_rdp(b, q, alpha, relation, n, J)
        except OverflowError:  # a radius so large that the moments overflow: far outside the budget
            return math.inf
    lo, hi = 0.0, 1.0
    while bound(hi) <= eps_q:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if bound(mid) <= eps_q:
            lo = mid
        else:
            hi = mid
    return lo
