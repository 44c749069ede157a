"""Poisson sampling of a user's training ``DataLoader``.

DP-SGD's privacy analysis (the *sampled* Gaussian mechanism) assumes that each example
joins each batch independently with probability ``q``. A shuffled loader with a fixed batch
size is a different mechanism, so :func:`poisson_dataloader` rebuilds the user's loader
around a :class:`PoissonBatchSampler` and keeps everything else the user chose (dataset,
``collate_fn``, workers, pinning, generator).

Each draw is collated (in the loader's workers) into a :class:`PoissonBatch`: the whole draw
in the user's own format (what their ``collate_fn`` makes of it), and, when it is larger than
``max_physical_batch_size``, physical chunks collated separately. The loader
(:class:`PoissonDataLoader`) yields the whole draw, so every Lightning hook and callback that
reads the batch sees what it would see without DP, and keeps the draws, in order, for the
strategy: their exact example counts let it (a) skip ``training_step`` on an empty draw while
still taking the noise-only step the analysis accounts for, (b) verify that per-sample
gradients have one row per example, and (c) refuse any training batch that did not come from
this sampler.

Why one module of about 450 lines: the sampler, the collate that records each draw, the loader
and the empty-batch rules are one contract (each batch the loop sees is exactly one recorded
draw); a third of it is the error messages that say what to change.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

__all__ = [
    "EMPTY_DRAW",
    "EmptyDraw",
    "PoissonBatch",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "check_rows",
    "empty_batch",
    "poisson_dataloader",
]


class EmptyDraw:
    """The training batch of an empty Poisson draw whose ``collate_fn`` cannot build an empty
    batch (a custom batch class, a 0-dimensional field): ``training_step`` is not called on it,
    the step adds noise only, as for any empty draw. Hooks that read the batch see this object."""

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "EmptyDraw()"


#: The one :class:`EmptyDraw`.
EMPTY_DRAW = EmptyDraw()


def _leading_dims(batch: Any, out: set[int], depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0:
            out.add(int(batch.shape[0]))
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _leading_dims(value, out, depth + 1)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _leading_dims(value, out, depth + 1)


def check_rows(batch: Any, size: int, name: str = "DP training") -> None:
    """Refuse a training batch whose tensors do not hold ``size`` examples (a batch hook added or
    removed rows): the Poisson draw accounts for exactly the examples drawn. Batches without a
    tensor of at least one dimension are not checked."""
    dims: set[int] = set()
    _leading_dims(batch, dims)
    if dims and size not in dims:
        raise RuntimeError(
            f"{name}: the training batch holds tensors of {sorted(dims)} rows, but {size} examples were Poisson-"
            "sampled for it. A batch hook (on_before_batch_transfer, transfer_batch_to_device, "
            "on_after_batch_transfer) or the collate_fn changed the number of examples; privacy accounting "
            "counts the examples drawn, one row each. Keep one row per example in these hooks (augment in place), "
            "and never mix, add or replace examples there."
        )


@dataclass(frozen=True)
class PoissonBatch:
    """One Poisson draw, whole and in physical chunks.

    Attributes:
        whole: the draw collated by the user's ``collate_fn`` (for an empty draw: an empty batch
            of the usual structure, or ``None`` when none can be built).
        chunks: the batches to compute on: ``(whole,)`` when the draw fits one physical batch,
            else the draw split into chunks of at most ``max_physical_batch_size`` examples,
            each collated separately; ``()`` for an empty draw.
        sizes: number of examples in each chunk (``len(sizes) == len(chunks)``).
        sample_rate: the rate ``q`` each example was drawn with.
        expected_size: the expected number of examples per draw, ``q * N``; the DP-SGD
            update is divided by this, never by the realised size (which is private). With
            user-level privacy: the expected number of users.
        units: with user-level privacy, for each chunk, the number of examples of each of its
            users, in order (:mod:`lightning_dp.mechanism.user_sampling`); ``()``: every example
            is its own unit.
    """

    whole: Any
    chunks: tuple[Any, ...]
    sizes: tuple[int, ...]
    sample_rate: float
    expected_size: float
    units: tuple[tuple[int, ...], ...] = ()

    @property
    def size(self) -> int:
        """Number of examples drawn (may be 0)."""
        return sum(self.sizes)

    @property
    def split(self) -> bool:
        """Whether the draw came in several chunks (else its one chunk, if any, is :attr:`whole`)."""
        return len(self.chunks) > 1

    def __len__(self) -> int:
        return self.size


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields index lists where each of ``num_samples`` indices is included independently
    with probability ``sample_rate``.

    Args:
        num_samples: size of the dataset ``N``.
        sample_rate: inclusion probability ``q`` in ``(0, 1]``.
        steps: number of draws per epoch (the epoch's length).
        generator: the random source. ``None`` uses torch's global generator, so
            ``seed_everything`` makes runs reproducible.
        secure_mode: draw each batch from a generator freshly seeded with OS entropy,
            so the draws cannot be replayed from a seed set in code.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=10, sample_rate=0.3, steps=4)
        >>> len(sampler)
        4
        >>> all(0 <= i < 10 for batch in sampler for i in batch)
        True
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator
        self.secure_mode = secure_mode
        # The dataset indices the draws range over (this process's shard); all by default.
        self.indices = None if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        if self.indices is not None and len(self.indices) != num_samples:
            raise ValueError("indices must list num_samples dataset indices")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            generator = self.generator
            if self.secure_mode:
                generator = torch.Generator().manual_seed(secrets.randbits(63))
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            chosen = mask.nonzero(as_tuple=True)[0]
            yield (chosen if self.indices is None else self.indices[chosen]).tolist()


class _PoissonCollate:
    """Collates a Poisson draw into a :class:`PoissonBatch`.

    A top-level class (not a closure) so loaders with worker processes can pickle it.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any],
        max_physical_batch_size: Optional[int],
        sample_rate: float,
        expected_size: float,
        empty: Any = None,
    ) -> None:
        self.collate_fn = collate_fn
        self.max_physical_batch_size = max_physical_batch_size
        self.sample_rate = sample_rate
        self.expected_size = expected_size
        self.empty = empty

    def __call__(self, samples: Sequence[Any]) -> PoissonBatch:
        samples = list(samples)
        if not samples:
            return PoissonBatch(self.empty, (), (), self.sample_rate, self.expected_size)
        whole = self.collate_fn(samples)
        k = self.max_physical_batch_size
        if k is None or len(samples) <= k:
            return PoissonBatch(whole, (whole,), (len(samples),), self.sample_rate, self.expected_size)
        groups = [samples[i : i + k] for i in range(0, len(samples), k)]
        return PoissonBatch(
            whole=whole,
            chunks=tuple(self.collate_fn(g) for g in groups),
            sizes=tuple(len(g) for g in groups),
            sample_rate=self.sample_rate,
            expected_size=self.expected_size,
        )


class PoissonDataLoader(DataLoader):
    """The training loader DP training replaces the user's with: batches are Poisson draws.

    Iterating yields each draw in the user's own format (:attr:`PoissonBatch.whole`), so hooks
    and callbacks see the batch they expect, and appends the :class:`PoissonBatch` to
    :attr:`draws`, in the order the batches are yielded (Lightning fetches one batch ahead),
    for the strategy to take when that batch trains. A new iteration (epoch) starts with no
    pending draws: a draw fetched but never trained was never used.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draws: deque[PoissonBatch] = deque()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.draws.clear()
        return _Whole(super().__iter__(), self.draws)


class _Whole:
    def __init__(self, iterator: Iterator[PoissonBatch], draws: deque[PoissonBatch]) -> None:
        self._iterator = iterator
        self._draws = draws

    def __iter__(self) -> _Whole:
        return self

    def __next__(self) -> Any:
        draw = next(self._iterator)
        self._draws.append(draw)
        return draw.whole

    def __len__(self) -> int:
        return len(self._iterator)  # type: ignore[arg-type]


def empty_batch(collate_fn: Callable[[list[Any]], Any], example: Any) -> Any:
    """A batch of zero examples with the structure of ``collate_fn``'s batches: the user's
    ``collate_fn([])`` when it accepts an empty list, else ``example`` collated alone with every
    tensor sliced to length 0 and every list of per-example values emptied (only the shapes of its
    fields remain).

    Raises:
        TypeError: for a batch holding something other than tensors, lists, tuples, dicts and
            ``None`` (no empty version of it can be built).
    """
    try:
        return collate_fn([])
    except Exception:
        pass
    return _emptied(collate_fn([example]), "batch")


def _emptied(value: Any, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            raise TypeError(
                f"The collated batch holds a 0-dimensional tensor at {path}: the empty batch of an empty "
                "Poisson draw cannot be built from it. Make every tensor of a batch have the examples along "
                "dimension 0."
            )
        return value[:0]
    if isinstance(value, Mapping):
        return type(value)({k: _emptied(v, f"{path}[{k!r}]") for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)):
        if not hasattr(value, "_fields") and all(isinstance(v, (str, bytes, int, float, bool)) for v in value):
            return type(value)()  # one value per example, as default_collate gives strings
        items = [_emptied(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _emptied(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)
                  if f.init}
        return dataclasses.replace(value, **fields)
    if value is None:
        return None
    raise TypeError(
        f"The collated batch holds a {type(value).__name__} at {path}: the empty batch of an empty Poisson "
        "draw cannot be built from it. Return tensors, lists, tuples, dicts and dataclasses from the collate_fn, "
        "or make "
        "collate_fn([]) return an empty batch."
    )


def poisson_dataloader(
    dataloader: DataLoader,
    max_physical_batch_size: Optional[int] = None,
    secure_mode: bool = False,
    rank: int = 0,
    world_size: int = 1,
    generator: Optional[torch.Generator] = None,
) -> PoissonDataLoader:
    """Rebuild ``dataloader`` so each batch is a Poisson sample of its dataset.

    The sampling rate is ``q = world_size * batch_size / len(dataset)`` and an epoch has
    ``ceil(len(dataset) / (world_size * batch_size))`` draws, the length of the original loader
    (of each process's share of it). With several processes, process ``rank`` samples the
    disjoint shard ``rank, rank + world_size, ...`` at rate ``q``, so the union over processes
    is a Poisson sample of the whole dataset. The dataset, ``collate_fn``, worker settings and
    pinning are kept; draws use ``generator`` if given, else the loader's, else torch's global
    generator.

    Raises:
        TypeError: for an ``IterableDataset`` or a dataset without ``__len__``.
        ValueError: when the loader has no usable ``batch_size`` (a custom
            ``batch_sampler``, or ``batch_size=None``), uses a sampler that would select
            other examples than a uniform draw (weighted or subset samplers), or its batch
            size exceeds the dataset.
    """
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "DP training needs random access to the training set to Poisson-sample it, but the "
            "training DataLoader wraps an IterableDataset. Use a map-style Dataset "
            "(with __len__ and __getitem__)."
        )
    if not hasattr(dataset, "__len__"):
        raise TypeError("The training dataset has no __len__, so it cannot be Poisson-sampled.")
    batch_size = dataloader.batch_size
    if batch_size is None:
        raise ValueError(
            "The training DataLoader has no batch_size (it uses a custom batch_sampler or "
            "batch_size=None). DP training derives the sampling rate q = batch_size / len(dataset) "
            "from it: pass DataLoader(dataset, batch_size=B) and drop the batch_sampler."
        )
    sampler = dataloader.sampler
    injected = world_size > 1 and isinstance(sampler, DistributedSampler)  # Lightning's, for DDP: the shard replaces it
    if not injected and type(sampler) not in (RandomSampler, SequentialSampler):
        raise ValueError(
            f"The training DataLoader uses a {type(sampler).__name__}; DP training replaces the "
            "sampler with Poisson sampling over the whole dataset, which would train on examples "
            "your sampler excludes or weights differently. Restrict the data with "
            "torch.utils.data.Subset instead and use a plain DataLoader(dataset, batch_size=B)."
        )
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        raise ValueError(
            "The training DataLoader's RandomSampler draws with replacement or a custom num_samples; "
            "DP training replaces it with Poisson sampling. Use DataLoader(dataset, batch_size=B, "
            "shuffle=True)."
        )
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("The training dataset is empty.")
    if world_size * batch_size > num_samples:
        raise ValueError(
            f"batch_size={batch_size} x {world_size} process(es) exceeds the training set ({num_samples} examples); "
            "the sampling rate q = processes * batch_size / len(dataset) must be at most 1."
        )
    if max_physical_batch_size is not None and max_physical_batch_size <= 0:
        raise ValueError(f"max_physical_batch_size must be positive, got {max_physical_batch_size}")

    sample_rate = world_size * batch_size / num_samples
    shard = range(rank, num_samples, world_size)
    batch_sampler = PoissonBatchSampler(
        num_samples=len(shard),
        sample_rate=sample_rate,
        steps=math.ceil(num_samples / (world_size * batch_size)),
        generator=generator if generator is not None else dataloader.generator,
        secure_mode=secure_mode,
        indices=shard if world_size > 1 else None,
    )
    user_collate = dataloader.collate_fn or default_collate
    try:
        empty: Any = empty_batch(user_collate, dataset[0])
    except Exception:
        empty = None  # hooks then see None on an empty draw (manual optimization refuses it)
    collate = _PoissonCollate(
        user_collate,
        max_physical_batch_size,
        sample_rate,
        expected_size=float(world_size * batch_size),  # q * N: the global expected batch
        empty=empty,
    )
    extra: dict[str, Any] = {}
    if dataloader.num_workers > 0:
        extra["prefetch_factor"] = dataloader.prefetch_factor
        extra["persistent_workers"] = dataloader.persistent_workers
    if getattr(dataloader, "in_order", True) is False:
        extra["in_order"] = False
    return PoissonDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        pin_memory_device=dataloader.pin_memory_device,
        **extra,
    )


def fetch_examples(dataloader: DataLoader, indices: Sequence[int]) -> dict[int, Any]:
    """The dataset items at ``indices`` of a Poisson loader's dataset, fetched once each."""
    return {i: dataloader.dataset[i] for i in indices}


def collate_examples(dataloader: DataLoader, examples: Sequence[Any]) -> Any:
    """Collate dataset items as one batch with the user's ``collate_fn``.

    Used by the per-sample gradient check to build batches from real training examples.
    """
    collate = dataloader.collate_fn
    assert isinstance(collate, _PoissonCollate)
    return collate.collate_fn(list(examples))


def is_poisson_dataloader(dataloader: object) -> bool:
    return isinstance(dataloader, PoissonDataLoader) and isinstance(dataloader.collate_fn, _PoissonCollate)

