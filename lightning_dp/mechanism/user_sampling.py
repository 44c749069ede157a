"""User-level privacy: Poisson sampling of people, not rows.

One person writes many examples (chat turns, notes, a character's lines), so example-level DP
protects a sentence, not a person. With ``DPStrategy(privacy_unit="user")`` the unit is the user:

* **Sampling is over users**: each user joins a draw independently with rate
  ``q = users per batch / number of users`` (the loader's ``batch_size`` counts users), and a
  sampled user contributes at most ``max_examples_per_user`` of their examples: all of them, or a
  fresh random subset of that size (the cap is public and fixed in advance).
* **Clipping is per user**: the gradient of the *sum* of a user's selected examples' losses is
  clipped to ``C`` (the strategy groups the per-example gradients of each user before clipping);
  noise is added once and the sum divided by the expected number of users. Physical batches never
  split a user.
* **Accounting** is the sampled Gaussian's with ``q`` over users: every figure is user-level.

The draw's user boundaries travel through the loader's workers with the examples themselves:
the batch sampler yields ``(index, slot)`` keys, the dataset wrapper tags each example with its
slot, and the collate function turns runs of equal slots into :attr:`PoissonBatch.units`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_dp.mechanism.sampling import (
    PoissonBatch,
    PoissonDataLoader,
    _PoissonCollate,
    empty_batch,
)

__all__ = ["UserPoissonBatchSampler", "user_groups", "user_poisson_dataloader"]


def canonical_user_ids(user_ids: Any) -> list[Hashable]:
    """``user_ids`` as a list of plain ids (``str``, ``int`` or finite ``float``, one type), or a
    ValueError. A tensor's elements hash by identity and a NaN equals nothing: either would
    silently make every example its own "user"; ``1``, ``1.0`` and ``True`` compare equal and
    would merge different people."""
    if hasattr(user_ids, "tolist"):  # a tensor or an array: its values, not its element objects
        user_ids = user_ids.tolist()
    out: list[Hashable] = []
    kinds: set[type] = set()
    for index, value in enumerate(user_ids):
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy or torch scalars
        if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float, tuple)):
            raise ValueError(
                f"user ids must be strings, integers or finite floats (one type for all), got {value!r} "
                f"({type(value).__name__}) at index {index}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"user id {value!r} at index {index} is not a usable id (a missing value?): every example "
                             "needs its user's id")
        kinds.add(type(value))
        out.append(value)
    if len(kinds) > 1:
        raise ValueError(
            f"user ids mix {sorted(k.__name__ for k in kinds)}: ids of different types can compare equal (1 == 1.0) "
            "and merge different people. Give every id the same type (e.g. str)."
        )
    return out


def user_groups(user_ids: Sequence[Hashable], num_examples: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The dataset indices of each user, in order of first appearance; with several processes,
    the users of process ``rank`` (users ``rank, rank + world_size, ...``: a user is on one
    process only)."""
    if len(user_ids) != num_examples:
        raise ValueError(
            f"user_ids names {len(user_ids)} users for {num_examples} training examples: give one user id per example "
            "(the dataset's user_ids, or DPStrategy(user_ids=...))."
        )
    order: dict[Hashable, list[int]] = {}
    for index, user in enumerate(user_ids):
        try:
            order.setdefault(user, []).append(index)
        except TypeError:
            raise ValueError(f"user ids must be hashable (str, int, ...), got {type(user).__name__} at index {index}") from None
    groups = list(order.values())
    return groups[rank::world_size]


class UserPoissonBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, per draw, the ``(index, slot)`` keys of the examples of the users who joined
    (each independently with probability ``sample_rate``), at most ``cap`` per user.

    Example:
        >>> sampler = UserPoissonBatchSampler([[0, 1, 2], [3], [4, 5]], 1.0, steps=1, cap=2,
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> [len([k for k in next(iter(sampler)) if k[1] == slot]) for slot in range(3)]  # at most 2 each
        [2, 1, 2]
    """

    def __init__(self, groups: Sequence[Sequence[int]], sample_rate: float, steps: int, cap: int,
                 generator: Optional[torch.Generator] = None, secure_mode: bool = False) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if cap < 1:
            raise ValueError(f"max_examples_per_user must be >= 1, got {cap}")
        self.groups = [list(g) for g in groups]
        self.sample_rate = sample_rate
        self.steps = steps
        self.cap = cap
        self.generator = generator
        self.secure_mode = secure_mode

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(self.steps):
            generator = self.generator
            if self.secure_mode:
                generator = torch.Generator().manual_seed(secrets.randbits(63))
            joined = (torch.rand(len(self.groups), generator=generator) < self.sample_rate).nonzero(as_tuple=True)[0]
            keys: list[tuple[int, int]] = []
            for slot, user in enumerate(joined.tolist()):
                indices = self.groups[user]
                if len(indices) > self.cap:  # a fresh random subset, drawn from the same private stream
                    chosen = torch.randperm(len(indices), generator=generator)[: self.cap].tolist()
                    indices = [indices[i] for i in sorted(chosen)]
                keys.extend((index, slot) for index in indices)
            yield keys


class _Tagged:
    """An example and the slot of its user in the draw."""

    __slots__ = ("item", "slot")

    def __init__(self, slot: int, item: Any) -> None:
        self.slot, self.item = slot, item


class _UserTagged(Dataset):
    """The user's dataset, answering ``(index, slot)`` keys with tagged examples (and plain
    indices with plain examples, for the check)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, slot = key
            return _Tagged(slot, self.dataset[index])
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # unpickling (worker processes) looks it up before it is set
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _UserCollate(_PoissonCollate):
    """Collates a user-level draw: chunks hold whole users, :attr:`PoissonBatch.units` counts
    each user's examples."""

    def __call__(self, samples: Sequence[Any]) -> PoissonBatch:
        tagged = list(samples)
        if not tagged:
            return PoissonBatch(self.empty, (), (), self.sample_rate, self.expected_size)
        items = [t.item for t in tagged]
        users: list[int] = []
        for i, t in enumerate(tagged):
            if i and t.slot == tagged[i - 1].slot:
                users[-1] += 1
            else:
                users.append(1)
        k = self.max_physical_batch_size
        if k is None or len(items) <= k:
            whole = self.collate_fn(items)
            return PoissonBatch(whole, (whole,), (len(items),), self.sample_rate, self.expected_size, (tuple(users),))
        chunks: list[list[int]] = [[]]
        for n in users:  # whole users per chunk: one user's contribution is never split
            if chunks[-1] and sum(chunks[-1]) + n > k:
                chunks.append([])
            chunks[-1].append(n)
        start, parts = 0, []
        for chunk in chunks:
            parts.append(items[start : start + sum(chunk)])
            start += sum(chunk)
        return PoissonBatch(
            whole=self.collate_fn(items), chunks=tuple(self.collate_fn(p) for p in parts),
            sizes=tuple(len(p) for p in parts), sample_rate=self.sample_rate, expected_size=self.expected_size,
            units=tuple(tuple(c) for c in chunks),
        )


def resolve_user_ids(dataset: Any, user_ids: Any) -> Sequence[Hashable]:
    """The user id of each example: ``user_ids`` (a sequence, or a callable on the dataset), else
    the dataset's own ``user_ids`` attribute; checked by :func:`canonical_user_ids`."""
    if callable(user_ids):
        user_ids = user_ids(dataset)
    elif user_ids is None:
        user_ids = getattr(dataset, "user_ids", None)
        if user_ids is None:
            raise ValueError(
                "privacy_unit='user' needs to know whose each training example is: give the training Dataset a "
                "user_ids attribute (one hashable per index), or pass DPStrategy(user_ids=...) (a sequence, or a "
                "callable on the dataset, which works with DataModules)."
            )
    return canonical_user_ids(user_ids)


def check_row_order(collate_fn: Callable[[list[Any]], Any], items: Sequence[Any]) -> None:
    """Refuse a ``collate_fn`` that reorders examples (sorting by length or label): a user's
    examples are found by their position in the draw, so a reordered batch would assign examples
    to the wrong people. Collates ``items`` and their reverse and compares the rows of every
    tensor with one row per item."""
    if len(items) < 2:
        return
    forward, backward = collate_fn(list(items)), collate_fn(list(reversed(items)))
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def walk(a: Any, b: Any) -> None:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dim() > 0 and a.shape[0] == len(items) and a.shape == b.shape:
                pairs.append((a, b))
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in a:
                if key in b:
                    walk(a[key], b[key])
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            for x, y in zip(a, b):
                walk(x, y)

    walk(forward, backward)
    if any(not torch.equal(a.flip(0), b) for a, b in pairs):
        raise ValueError(
            "The training DataLoader's collate_fn reorders the examples of a batch (sorting them?). With "
            "privacy_unit='user' a user's examples are found by their position in the draw, so the collate_fn must "
            "keep the examples in the order it receives them (pad or stack them in place)."
        )


def user_poisson_dataloader(
    dataloader: DataLoader,
    user_ids: Any,
    max_examples_per_user: int,
    max_physical_batch_size: Optional[int] = None,
    secure_mode: bool = False,
    rank: int = 0,
    world_size: int = 1,
    generator: Optional[torch.Generator] = None,
) -> PoissonDataLoader:
    """Rebuild ``dataloader`` so each batch is a Poisson sample of *users*: ``q = world_size *
    batch_size / number of users``, ``ceil(users / (world_size * batch_size))`` draws an epoch.
    Otherwise as :func:`~lightning_dp.mechanism.sampling.poisson_dataloader` (whose checks of the
    loader apply: call it first)."""
    dataset = dataloader.dataset
    num_examples = len(dataset)  # type: ignore[arg-type]
    ids = resolve_user_ids(dataset, user_ids)
    all_users = user_groups(ids, num_examples)
    num_users = len(all_users)
    if num_users == num_examples > 1:
        warnings.warn(
            f"user_ids names {num_examples} different users for {num_examples} examples: user-level privacy then "
            "protects single examples. If people wrote several examples each, check the ids.",
            stacklevel=2,
        )
    batch_size = dataloader.batch_size
    assert batch_size is not None
    if world_size * batch_size > num_users:
        raise ValueError(
            f"batch_size={batch_size} users x {world_size} process(es) exceeds the {num_users} users of the training "
            "set; with privacy_unit='user' the DataLoader's batch_size is the expected number of users per batch."
        )
    if max_physical_batch_size is not None and max_physical_batch_size < max_examples_per_user:
        raise ValueError(
            f"max_physical_batch_size={max_physical_batch_size} is below max_examples_per_user={max_examples_per_user}: "
            "a physical batch must hold a whole user (one user's contribution is clipped as one)."
        )
    sample_rate = world_size * batch_size / num_users
    sampler = UserPoissonBatchSampler(
        user_groups(ids, num_examples, rank, world_size), sample_rate,
        steps=math.ceil(num_users / (world_size * batch_size)), cap=max_examples_per_user,
        generator=generator if generator is not None else dataloader.generator, secure_mode=secure_mode,
    )
    user_collate: Callable[[list[Any]], Any] = dataloader.collate_fn or _default_collate()
    check_row_order(user_collate, [dataset[i] for i in range(min(8, num_examples))])
    try:
        empty: Any = empty_batch(user_collate, dataset[0])
    except Exception:
        empty = None
    collate = _UserCollate(user_collate, max_physical_batch_size, sample_rate, float(world_size * batch_size), empty)
    loader = PoissonDataLoader(
        _UserTagged(dataset), batch_sampler=sampler, collate_fn=collate, num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory, worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
    )
    loader.privacy_unit, loader.unit_count = "user", num_users  # type: ignore[attr-defined]
    # Every process must shard the same ids: the strategy compares this digest across processes.
    loader.user_digest = hashlib.sha256(repr(ids).encode()).hexdigest()  # type: ignore[attr-defined]
    return loader


def _default_collate() -> Callable[[list[Any]], Any]:
    from torch.utils.data._utils.collate import default_collate

    return default_collate  # type: ignore[no-any-return]
