"""Private Evolution: differentially private synthetic data from a public generator's API, with no
gradient on the private data (Lin et al., ICLR 2024, arXiv 2305.15560; Aug-PE for text, Xie et
al., ICML 2024, arXiv 2403.01749; Microsoft's reference package ``pe``).

Per public class, a population drawn from ``random_api`` evolves towards the private data. Each
iteration: embed the population with a fixed public embedding (or the mean embedding of
``lookahead`` variations of each sample); every private sample votes for its ``num_neighbors``
nearest samples of its own class with weight ``1/sqrt(num_neighbors)``, so that one sample's votes
have L2 norm exactly 1; Gaussian noise of standard deviation ``sigma`` goes on every bin of every
class (one Gaussian mechanism per iteration, sensitivity 1, under adding or removing one private
sample: a sample votes in its own class only); the threshold ``H`` is subtracted and the counts
clipped at 0; the next parents are drawn in proportion to what is left (or the top counts); their
``variation_api`` outputs are the next population.

**The private data is read in one place**: :class:`PrivateVotes`, which embeds it and counts the
votes. Everything after the noise is post-processing of the noisy histograms (a test replays the
noisy histograms against a private set that raises when touched and gets the same samples).

Privacy: ``T`` iterations are ``T`` adaptive Gaussian mechanisms, ``mu``-GDP with
``mu = sqrt(T) / sigma`` (exact; :mod:`lightning_dp.core.gaussian_dp`); ``sigma`` is calibrated to
``(epsilon, delta)``. Class sizes are private: the class fractions are public input (uniform by
default) or, with ``class_fractions="private"``, released with the same Gaussian noise as one more
mechanism (charged). Under the replace-one relation the sensitivity is ``sqrt(2)``: ask for
``epsilon`` at the add/remove relation, as DP-SGD libraries do.

Differences from the reference ``pe`` (v1, 2026): an all-zero histogram (every bin at or below the
threshold after noise) falls back to uniform selection with a warning and is counted (``pe``
divides 0 by 0 and NumPy raises); private class counts are never read silently (``pe`` reads them
with a warning when no fractions are given); ``rank`` selection with a population no larger than
the selection is refused (it would select everything: no evolution).

Example:
    >>> import torch
    >>> private = torch.randn(200, 2) + torch.tensor([3.0, 0.0])   # the private set: around (3, 0)
    >>> random_api = lambda label, n: torch.randn(n, 2) * 3
    >>> variation_api = lambda samples, strength: samples + strength * torch.randn_like(samples)
    >>> pe = PrivateEvolution(random_api, variation_api, embed=lambda x: x, num_samples=50, iterations=5,
    ...                       epsilon=4.0, delta=1e-5, threshold=2.0, progress=False,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> result = pe.fit(private)
    >>> len(result.samples), round(result.epsilon, 3), bool(result.samples.mean(0)[0] > 1.5)
    (50, 4.0, True)
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_dp.core.events import GaussianRelease
from lightning_dp.core.gaussian_dp import calibrate_noise_multiplier, gdp_epsilon, gdp_mu
from lightning_dp.core.history import Entry, PrivacyHistory

__all__ = ["PEResult", "PrivateEvolution", "PrivateVotes", "vote_histogram"]

log = logging.getLogger(__name__)

Samples = Any  # a Tensor / ndarray (rows are samples) or a list (e.g. of strings)


# ---------------------------------------------------------------------------------- samples
def _len(samples: Samples) -> int:
    return int(samples.shape[0]) if hasattr(samples, "shape") else len(samples)


def _take(samples: Samples, index: Sequence[int]) -> Samples:
    if isinstance(samples, Tensor):
        return samples[torch.as_tensor(list(index), dtype=torch.long, device=samples.device)]
    if isinstance(samples, np.ndarray):
        return samples[np.asarray(list(index), dtype=np.int64)]
    return [samples[i] for i in index]


def _concat(parts: list[Samples]) -> Samples:
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


# ---------------------------------------------------------------------------------- the histogram
@torch.no_grad()
def vote_histogram(private: Tensor, synthetic: Tensor, num_neighbors: int = 1, distance: str = "l2",
                   chunk_size: int = 4096, weighted: bool = True) -> Tensor:
    """The clean vote histogram (float64, one bin per row of ``synthetic``): each row of
    ``private`` gives ``1/sqrt(num_neighbors)`` to each of its ``num_neighbors`` nearest rows of
    ``synthetic`` (distinct rows, so its votes have L2 norm exactly 1). In chunks of
    ``chunk_size`` private rows, on the device ``synthetic`` is on. ``weighted=False``: the
    integer vote counts (exact in float64 whatever the order of summation, so that shards summed
    across processes equal one pass); multiply by ``1/sqrt(num_neighbors)`` afterwards.

    Example:
        >>> vote_histogram(torch.tensor([[0.0], [0.1], [5.0]]), torch.tensor([[0.0], [4.0]])).tolist()
        [2.0, 1.0]
    """
    if distance not in ("l2", "cosine"):
        raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
    m = synthetic.shape[0]
    if not 1 <= num_neighbors <= m:
        raise ValueError(f"num_neighbors must be in [1, {m}] (the population's size), got {num_neighbors}")
    counts = torch.zeros(m, dtype=torch.float64, device=synthetic.device)
    syn = synthetic.float()
    if distance == "cosine":
        syn = torch.nn.functional.normalize(syn, dim=1)
    for start in range(0, private.shape[0], chunk_size):
        chunk = private[start:start + chunk_size].to(device=syn.device, dtype=torch.float32)
        if distance == "cosine":
            scores = -(torch.nn.functional.normalize(chunk, dim=1) @ syn.T)
        else:
            scores = torch.cdist(chunk, syn)
        scores = torch.nan_to_num(scores, nan=math.inf)  # a NaN row still votes once (for some bins)
        nearest = scores.topk(num_neighbors, dim=1, largest=False).indices.reshape(-1)
        counts.index_add_(0, nearest, torch.ones(nearest.shape, dtype=torch.float64, device=counts.device))
    return counts / math.sqrt(num_neighbors) if weighted else counts


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _collective(t: Tensor) -> Tensor:
    """``t`` where the process group's backend can reduce it (NCCL: the current GPU; else the CPU)."""
    if torch.distributed.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def _broadcast(obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (unchanged in one process)."""
    if not _distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class PrivateVotes:
    """The only reader of the private data: its embeddings, split by class, and the clean vote
    histograms of a population. ``sharded=True`` (under ``torch.distributed``): each process holds
    a disjoint shard of the private set and the histograms are summed over the processes (before
    any noise); otherwise every process is taken to hold the whole set and nothing is summed."""

    def __init__(self, private_x: Samples, private_y: Optional[Sequence[Any]], classes: list[Any],
                 embed: Callable[[Samples], Tensor], num_neighbors: int, distance: str, chunk_size: int,
                 device: Optional[torch.device], sharded: bool = False) -> None:
        if sharded and not _distributed():
            raise ValueError("sharded=True needs an initialised torch.distributed process group of several processes.")
        self.sharded = sharded
        n = _len(private_x)
        labels = [None] * n if private_y is None else _labels(private_y, n)
        position = {c: i for i, c in enumerate(classes)}
        unknown = {y for y in labels if y not in position}
        if unknown:
            raise ValueError(f"{len(unknown)} private label value(s) are not among the public classes {classes}: "
                             "give every class in `classes` (the class list is public, it is never read from the data).")
        self.num_neighbors, self.distance, self.chunk_size = num_neighbors, distance, chunk_size
        self.embeddings: dict[Any, Optional[Tensor]] = {}
        for c in classes:
            rows = [i for i, y in enumerate(labels) if y == c]
            parts = [_rows(embed(_take(private_x, rows[s:s + chunk_size])), len(rows[s:s + chunk_size]), "private")
                     for s in range(0, len(rows), chunk_size)]
            emb = torch.cat(parts) if parts else None
            self.embeddings[c] = emb.to(device) if (emb is not None and device is not None) else emb
        self._counts = {c: (0 if e is None else e.shape[0]) for c, e in self.embeddings.items()}

    def histograms(self, population_embeddings: dict[Any, Tensor]) -> dict[Any, Tensor]:
        """The clean histogram of each class's population (summed over processes)."""
        out = {}
        for c, syn in population_embeddings.items():
            own = self.embeddings[c]
            out[c] = (torch.zeros(syn.shape[0], dtype=torch.float64, device=syn.device) if own is None else
                      vote_histogram(own, syn.to(own.device), self.num_neighbors, self.distance, self.chunk_size,
                                     weighted=False))
        if self.sharded:
            flat = _collective(torch.cat([out[c] for c in out]))
            torch.distributed.all_reduce(flat)
            sizes = [out[c].numel() for c in out]
            out = dict(zip(out, (t.to(out[c].device) for t, c in zip(flat.split(sizes), out))))
        return {c: h / math.sqrt(self.num_neighbors) for c, h in out.items()}

    def class_counts(self) -> Tensor:
        """The number of private samples of each class (float64, summed over processes): private,
        released only with noise (``class_fractions="private"``)."""
        counts = torch.tensor([float(v) for v in self._counts.values()], dtype=torch.float64)
        if self.sharded:
            counts = _collective(counts)
            torch.distributed.all_reduce(counts)
        return counts.cpu()


def _rows(embedding: Any, n: int, what: str) -> Tensor:
    """``embedding`` as an ``(n, d)`` tensor: exactly one row per sample. An embedder that returns
    more (one row per chunk of a long document) would give one private sample several votes: a
    sensitivity above the 1 the accounting assumes."""
    emb = torch.as_tensor(embedding)
    if emb.dim() == 0 or emb.shape[0] != n:
        raise ValueError(f"embed returned {tuple(emb.shape)} for {n} {what} samples: it must return one row per "
                         "sample (pool the chunks of a long sample into one vector).")
    return emb.reshape(n, -1)


def _labels(private_y: Any, n: int) -> list[Any]:
    values = private_y.tolist() if hasattr(private_y, "tolist") else list(private_y)
    if len(values) != n:
        raise ValueError(f"private_y has {len(values)} labels for {n} private samples")
    return values


# ---------------------------------------------------------------------------------- the result
@dataclass
class PEResult:
    """A synthesis job's output and what it spent.

    Attributes:
        samples: the synthetic samples (classes in order), post-processing of DP releases: free to use.
        labels: their class indices (``classes[i]`` is the class of label ``i``).
        classes: the public class list.
        epsilon, delta: the job's guarantee (exact Gaussian DP composition).
        noise_multiplier: ``sigma`` of every release.
        releases: the number of Gaussian releases (iterations, plus one for private class fractions).
        history: one dict per iteration (``iteration``, ``epsilon`` so far, ``strength``,
            ``noisy_mass``, ``zero_classes``, ``metric``).
        fallbacks: classes x iterations whose thresholded histogram was all zero (uniform selection).
        privacy_history: the releases as a :class:`~lightning_dp.core.history.PrivacyHistory`.
        noisy_histograms: each iteration's released histograms (class to noisy counts, before the
            threshold): the DP outputs everything else was computed from.
    """

    samples: Samples
    labels: Tensor
    classes: list[Any]
    epsilon: float
    delta: float
    noise_multiplier: float
    releases: int
    history: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: int = 0
    privacy_history: PrivacyHistory = field(default_factory=PrivacyHistory)
    noisy_histograms: list[dict[Any, Tensor]] = field(default_factory=list)
    #: The report's accountant for this job (Opacus PRV composes the Gaussian releases: a cross-check).
    accountant: str = "prv"
    privacy_unit: str = "one private sample (added or removed)"


# ---------------------------------------------------------------------------------- the loop
class PrivateEvolution:
    """Private Evolution over public ``random_api`` / ``variation_api`` / ``embed`` callables.

    Args:
        random_api: ``random_api(class_label, n)``: ``n`` new samples of a class (``None`` for
            unlabelled data); public: it must not see the private data.
        variation_api: ``variation_api(samples, strength)``: one variation of each sample,
            ``strength`` in ``(0, 1]`` from ``variation_strengths`` (larger: a bigger change). If
            it has a parameter named ``label``, the samples' class is passed too (a prompt per class).
        embed: ``embed(samples)``: a ``(n, d)`` tensor; fixed and public (it embeds the private
            data too, inside :class:`PrivateVotes`, unless ``private_embed`` is given).
        private_embed: the embedding of the private samples when they are not of the synthetic
            samples' kind (e.g. images against a simulator's parameters); the same space as ``embed``.
        num_samples: the population's size during the evolution, over all classes.
        iterations: ``T``, the number of noisy histograms.
        epsilon, delta: the target; ``sigma`` is calibrated to it. Or give ``noise_multiplier``.
        threshold: ``H``, subtracted from every noisy count before selection (votes; about one
            ``sigma`` suits small private sets).
        lookahead: embed each sample as the mean embedding of this many variations (0: itself).
        num_neighbors: the nearest synthetic samples each private sample votes for.
        distance: ``"l2"`` or ``"cosine"``.
        classes: the public list of class labels (default: ``[None]``, unlabelled; with labels
            given to :meth:`fit` and no ``classes``, an error: the list is never read from the data).
        class_fractions: public fractions per class (default uniform), or ``"private"``: the class
            counts are released with noise ``sigma`` as one more Gaussian mechanism (charged).
        selection: ``"sample"`` (parents drawn in proportion to the counts) or ``"rank"`` (the
            highest counts; needs ``variations_per_parent >= 2`` so that there is a choice).
        variations_per_parent: variations of each selected parent in the next population.
        variation_strengths: ``T`` strengths, or a function of the iteration ``t = 1..T``
            (default: geometric from 0.6 down to 0.1).
        final_samples: the number of samples returned (default ``num_samples``): the last
            selection draws this many parents (post-processing: free).
        metric: ``metric(samples, labels) -> float`` logged each iteration. It must not read the
            private data (the history is released with the samples): use public or held-out data.
        ledger, name: a :class:`~lightning_dp.PrivacyLedger` to reserve the job's spend in.
        chunk_size, device: the nearest-neighbour search's private chunk and device (default: CUDA
            when present, else where the embeddings are).
        generator: the random source for noise and selection (default: seeded from OS entropy).
        progress: show a progress bar with the epsilon spent.
    """

    result_type: type = PEResult

    def __init__(
        self,
        random_api: Callable[[Any, int], Samples],
        variation_api: Callable[[Samples, float], Samples],
        embed: Callable[[Samples], Tensor],
        num_samples: int,
        iterations: int,
        epsilon: Optional[float] = None,
        delta: float = 1e-5,
        noise_multiplier: Optional[float] = None,
        threshold: float = 0.0,
        lookahead: int = 0,
        num_neighbors: int = 1,
        distance: str = "l2",
        classes: Optional[Sequence[Any]] = None,
        class_fractions: Union[None, str, Sequence[float]] = None,
        selection: str = "sample",
        variations_per_parent: int = 1,
        variation_strengths: Union[None, Sequence[float], Callable[[int], float]] = None,
        final_samples: Optional[int] = None,
        metric: Optional[Callable[[Samples, Tensor], float]] = None,
        private_embed: Optional[Callable[[Samples], Tensor]] = None,
        ledger: Any = None,
        name: str = "private-evolution",
        chunk_size: int = 4096,
        device: Union[None, str, torch.device] = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = True,
    ) -> None:
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if (epsilon is None) == (noise_multiplier is None):
            raise ValueError("give exactly one of epsilon (sigma is calibrated to it) and noise_multiplier")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if selection not in ("sample", "rank"):
            raise ValueError(f"selection must be 'sample' or 'rank', got {selection!r}")
        if not (isinstance(variations_per_parent, int) and variations_per_parent >= 1):
            raise ValueError(f"variations_per_parent must be an int >= 1, got {variations_per_parent!r}")
        if selection == "rank" and variations_per_parent < 2:
            raise ValueError("selection='rank' keeps the highest counts of a population as large as the selection: it "
                             "selects everything and nothing evolves. Use variations_per_parent >= 2, or 'sample'.")
        if not (isinstance(lookahead, int) and lookahead >= 0):
            raise ValueError(f"lookahead must be an int >= 0, got {lookahead!r}")
        self.classes = list(classes) if classes is not None else [None]
        if any(isinstance(c, (Tensor, np.ndarray)) for c in self.classes):
            raise TypeError("classes must be plain hashable values (ints, strings), not tensors or arrays.")
        # Distinct by equality, as labels are matched: [0, 0.0] would give one sample's votes to two classes.
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct (by ==), got {self.classes}")
        if isinstance(class_fractions, str) and class_fractions != "private":
            raise ValueError(f"class_fractions must be None, 'private' or one fraction per class, got {class_fractions!r}")
        if class_fractions is not None and not isinstance(class_fractions, str):
            fractions = [float(f) for f in class_fractions]
            if len(fractions) != len(self.classes) or any(not (f >= 0 and math.isfinite(f)) for f in fractions) \
                    or sum(fractions) <= 0:
                raise ValueError(f"class_fractions must be {len(self.classes)} finite fractions >= 0 with a positive "
                                 f"sum, got {class_fractions!r}")
        if num_samples < len(self.classes):
            raise ValueError(f"num_samples ({num_samples}) must give every one of the {len(self.classes)} classes a sample")
        self.random_api, self.variation_api, self.embed = random_api, variation_api, embed
        self.private_embed = private_embed if private_embed is not None else embed
        try:
            self._vary_with_label = "label" in inspect.signature(variation_api).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self._vary_with_label = False
        self.num_samples, self.iterations, self.delta = int(num_samples), iterations, float(delta)
        self.final_samples = int(final_samples) if final_samples is not None else self.num_samples
        self.threshold, self.lookahead, self.num_neighbors, self.distance = float(threshold), lookahead, num_neighbors, distance
        self.class_fractions, self.selection, self.variations_per_parent = class_fractions, selection, variations_per_parent
        self.metric, self.ledger, self.name = metric, ledger, name
        self.chunk_size, self.progress = chunk_size, progress
        if device is None and torch.cuda.is_available():
            device = "cuda"  # the nearest-neighbour search on the accelerator that is present
        self.device = torch.device(device) if device is not None else None
        self.generator = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        #: Gaussian releases: one per iteration, one more for private class fractions.
        self._private_fractions = class_fractions == "private" and len(self.classes) > 1  # one class: nothing to release
        self.releases = iterations + (1 if self._private_fractions else 0)
        if noise_multiplier is not None:
            self.noise_multiplier = float(noise_multiplier)
            self.epsilon = gdp_epsilon(gdp_mu(self.noise_multiplier, self.releases), self.delta)
        else:
            self.epsilon = float(epsilon)  # type: ignore[arg-type]
            self.noise_multiplier = calibrate_noise_multiplier(self.epsilon, self.delta, self.releases)
        self.strengths = self._strengths(variation_strengths)
        if not self._private_fractions:
            self._check_neighbors(self._split(self.num_samples, self._public_fractions()))

    def _public_fractions(self) -> list[float]:
        if self.class_fractions is None or self.class_fractions == "private":
            return [1.0] * len(self.classes)
        return [float(f) for f in self.class_fractions]

    def _check_neighbors(self, sizes: list[int]) -> None:
        # On public sizes (or sizes released with noise), before any vote: the error never depends
        # on the private data (a class without private samples never runs the search itself).
        if self.num_neighbors > min(sizes):
            raise ValueError(f"num_neighbors ({self.num_neighbors}) exceeds the smallest class population "
                             f"({min(sizes)}): raise num_samples or lower num_neighbors.")

    def _strengths(self, given: Any) -> list[float]:
        t_max = self.iterations
        if given is None:
            return [0.6 * (0.1 / 0.6) ** ((t - 1) / max(t_max - 1, 1)) for t in range(1, t_max + 1)]
        values = [float(given(t)) for t in range(1, t_max + 1)] if callable(given) else [float(s) for s in given]
        if len(values) != t_max:
            raise ValueError(f"variation_strengths has {len(values)} values for {t_max} iterations")
        return values

    # ------------------------------------------------------------------ helpers
    def _spent(self, releases: int) -> float:
        return gdp_epsilon(gdp_mu(self.noise_multiplier, releases), self.delta) if releases else 0.0

    def _noise(self, shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float64) * self.noise_multiplier

    def _split(self, total: int, fractions: list[float]) -> list[int]:
        """``total`` over the classes in proportion to ``fractions``: floors, the remainder to the
        largest fractional parts, at least one each."""
        s = sum(fractions)
        exact = [total * f / s for f in fractions]
        sizes = [int(math.floor(e)) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])[: total - sum(sizes)]:
            sizes[i] += 1
        return [max(1, n) for n in sizes]

    def _variation(self, samples: Samples, strength: float, label: Any) -> Samples:
        if self._vary_with_label:
            return self.variation_api(samples, strength, label=label)  # type: ignore[call-arg]
        return self.variation_api(samples, strength)

    def _embed_population(self, samples: Samples, strength: float, label: Any) -> Tensor:
        if self.lookahead == 0:
            emb = _rows(self.embed(samples), _len(samples), "synthetic")
        else:
            emb = torch.stack([_rows(self.embed(self._variation(samples, strength, label)), _len(samples),
                                     "synthetic").float() for _ in range(self.lookahead)]).mean(0)
        return emb.to(self.device) if self.device is not None else emb

    def _select(self, counts: Tensor, n: int) -> tuple[Tensor, bool]:
        """``n`` parent indices from the thresholded counts; ``True`` when they were all zero."""
        if float(counts.sum()) <= 0:
            return torch.randint(len(counts), (n,), generator=self.generator), True
        if self.selection == "rank":
            order = torch.argsort(counts.cpu(), descending=True, stable=True)
            return order[:n] if n <= len(order) else order[torch.arange(n) % len(order)], False
        return torch.multinomial(counts.cpu().float(), n, replacement=True, generator=self.generator), False

    def _vary(self, parents: Samples, strength: float, label: Any) -> Samples:
        return _concat([self._variation(parents, strength, label) for _ in range(self.variations_per_parent)])

    def _votes(self, private_x: Samples, private_y: Optional[Sequence[Any]]) -> PrivateVotes:
        return PrivateVotes(private_x, private_y, self.classes, self.private_embed, self.num_neighbors, self.distance,
                            self.chunk_size, self.device, sharded=getattr(self, "_sharded", False))

    # ------------------------------------------------------------------ the job
    def fit(self, private_x: Samples, private_y: Optional[Sequence[Any]] = None, sharded: bool = False) -> PEResult:
        """Evolve the population towards ``private_x`` (labels ``private_y``, values among
        ``classes``) and return the synthetic data. Under ``torch.distributed`` rank 0 runs the
        APIs and adds the noise, and every rank returns the same result; with ``sharded=True`` each
        process gives its own disjoint shard of the private set and the votes are summed (without
        it, every process must give the whole set: summing copies would count each sample once
        per process)."""
        self._sharded = sharded
        if private_y is not None and self.classes == [None]:
            raise ValueError("labels were given but no `classes`: pass the public list of class labels to "
                             "PrivateEvolution(classes=...) (it is never read from the private labels).")
        run = None
        # One process speaks for the job: every rank reserving would charge the dataset once per process.
        if self.ledger is not None and (not _distributed() or torch.distributed.get_rank() == 0):
            run = self.ledger.reserve(self.ledger.curve_of(self._history(self.releases)), name=self.name,
                                      kind="private_evolution")
        self._released = 0  # counted as the releases happen, so that a failure commits what was spent
        try:
            return self._evolve(self._votes(private_x, private_y))
        finally:
            if run is not None:
                spent = self._released
                self.ledger.commit(run, self.ledger.curve_of(self._history(spent)), epsilon=self._spent(spent),
                                   steps=spent)
                self.ledger.release(run)

    def _history(self, releases: int) -> PrivacyHistory:
        return PrivacyHistory([Entry(GaussianRelease(self.noise_multiplier), releases)] if releases else [])

    def _evolve(self, votes: PrivateVotes) -> PEResult:
        rank0 = not _distributed() or torch.distributed.get_rank() == 0
        fractions: list[float]
        if self._private_fractions:
            noisy = votes.class_counts() + self._noise(len(self.classes))
            self._released += 1
            fractions = _broadcast(noisy.clamp_min(0).tolist() if rank0 else None)
            if sum(fractions) <= 0:
                fractions = [1.0] * len(self.classes)
        else:
            fractions = self._public_fractions()
        sizes = self._split(self.num_samples, fractions)
        final_sizes = self._split(self.final_samples, fractions)
        self._check_neighbors(sizes)
        population = _broadcast({c: self.random_api(c, n) for c, n in zip(self.classes, sizes)} if rank0 else None)
        history: list[dict[str, Any]] = []
        released_histograms: list[dict[Any, Tensor]] = []
        fallbacks = 0
        bar = _progress(self.iterations, self.progress and rank0)
        for t in range(1, self.iterations + 1):
            strength = self.strengths[t - 1]
            embedded = _broadcast({c: self._embed_population(population[c], strength, c) for c in self.classes}
                                  if rank0 else None)
            clean = votes.histograms(embedded)
            # One Gaussian mechanism over every bin of every class, added once (by rank 0).
            noisy = _broadcast({c: clean[c].cpu() + self._noise(clean[c].numel()) for c in self.classes}
                               if rank0 else None)
            self._released += 1
            released_histograms.append(noisy)
            # From here on only the noisy histograms: post-processing.
            if rank0:
                nxt, zero = {}, 0
                for c, n_next in zip(self.classes, final_sizes if t == self.iterations else sizes):
                    counts = (noisy[c] - self.threshold).clamp_min(0)
                    parents, empty = self._select(counts, n_next)
                    zero += int(empty)
                    nxt[c] = self._vary(_take(population[c], parents.tolist()), strength, c)
                if zero:
                    warnings.warn(f"Private Evolution iteration {t}: {zero} class(es) had no count above the threshold "
                                  f"{self.threshold:g}; their parents were drawn uniformly (lower the threshold, or give "
                                  "more privacy budget or a smaller population).", stacklevel=2)
                fallbacks += zero
                population = nxt
            population = _broadcast(population if rank0 else None)
            record = {"iteration": t, "epsilon": self._spent(self._released), "strength": strength,
                      "noisy_mass": float(sum(noisy[c].clamp_min(0).sum() for c in self.classes)),
                      "zero_classes": fallbacks, "metric": None}
            if self.metric is not None and rank0:
                samples, labels = self._flatten(population)
                record["metric"] = float(self.metric(samples, labels))
            history.append(record)
            log.info("Private Evolution iteration %d/%d: epsilon %.4g, metric %s", t, self.iterations,
                     record["epsilon"], record["metric"])
            bar.update(record)
        bar.close()
        samples, labels = self._flatten(population)
        result = self.result_type(
            samples=samples, labels=labels, classes=list(self.classes), epsilon=self._spent(self._released),
            delta=self.delta, noise_multiplier=self.noise_multiplier, releases=self._released,
            history=_broadcast(history), fallbacks=_broadcast(fallbacks), privacy_history=self._history(self._released),
            noisy_histograms=released_histograms,
        )
        return result

    def _flatten(self, population: dict[Any, Samples]) -> tuple[Samples, Tensor]:
        parts = [population[c] for c in self.classes]
        labels = torch.cat([torch.full((_len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
        return _concat(parts), labels


class _progress:
    """A tqdm bar over the iterations with the epsilon spent (nothing when off or tqdm is missing)."""

    def __init__(self, total: int, on: bool) -> None:
        self.bar = None
        if on:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="Private Evolution", unit="iteration")
            except ImportError:  # pragma: no cover - tqdm comes with Lightning
                self.bar = None

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            postfix = {"epsilon": f"{record['epsilon']:.3f}"}
            if record["metric"] is not None:
                postfix["metric"] = f"{record['metric']:.4g}"
            self.bar.set_postfix(postfix)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
