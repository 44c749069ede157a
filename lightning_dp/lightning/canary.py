"""``CanaryExposure``: how much a trained language model memorised secrets it saw in training.

The measurement of Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks". Secret *canaries* of a known format (``"my number is
{secret}"`` with ``secret`` drawn uniformly from a candidate space ``R`` of digit strings) are
inserted into the training set a chosen number of times; after training, each canary's rank
among all candidates by the model's likelihood gives its *exposure*
``log2 |R| - log2 rank``. A canary the model has not memorised is just another candidate:
its rank is uniform on ``1..|R|`` and its exposure averages ``1/ln 2 = 1.44`` bits, whatever
``|R|``. A memorised one is ranked first: exposure ``log2 |R|``.

How the rank is measured (Carlini et al. section 4): when ``|R|`` is at most
``num_candidates`` every candidate is scored and the rank is exact. Otherwise
``num_candidates`` candidates are drawn uniformly from ``R`` and the fraction at least as
likely as the canary estimates ``rank / |R|``, counting the canary itself among the draws
(``(k + 1) / (m + 1)`` for ``k`` of the ``m`` draws other than the canary): the estimate never claims a rank below what
the sample resolves, and for a canary the model did not memorise it is as often high as for a
random candidate. Its ceiling is ``log2(m + 1)`` bits: a canary ranked first is reported at
the ceiling, not above. The paper's alternative, fitting a skew-normal to the candidates'
log-perplexities and reading off the canary's tail probability, reaches beyond the ceiling
but only by assuming the distribution's shape exactly where nothing was measured; here the
ceiling is stated instead (see :attr:`CanaryExposure.ceiling`).

Each inserted copy is one training example, so under DP-SGD a canary repeated ``r`` times is
protected by group privacy for ``r`` examples (roughly ``r * epsilon``), not ``epsilon``.

Why one module of about 500 lines: the canaries, the callback that inserts and scores them and
the exposure estimate share one secret (which canaries were inserted, with which seeds); split,
that secret would cross module boundaries.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["CanaryExposure", "next_token_log_likelihood"]

#: ``log_likelihood(pl_module, texts) -> Tensor``: each text's log-likelihood under the model.
LogLikelihood = Callable[[pl.LightningModule, list[str]], Tensor]


def next_token_log_likelihood(tokenize: Callable[[str], Union[Sequence[int], Tensor]]) -> LogLikelihood:
    """The log-likelihood of texts under a module whose ``forward`` returns next-token logits.

    The module is called on token ids of shape ``(batch, time)`` and must return logits of
    shape ``(batch, time, vocab)`` (or an object with such a ``.logits``, as Hugging Face
    causal LMs do), position ``t`` predicting token ``t + 1``. A text's log-likelihood is the
    sum of its tokens' log-probabilities after the first (which has no context; it is the
    same for all candidates of a format, so the ranking does not depend on it). Texts of
    different token lengths are padded and masked.

    Args:
        tokenize: a text to its token ids, as the model was trained on them.

    Returns:
        A function ``(pl_module, texts) -> Tensor`` of shape ``(len(texts),)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lightning as L
        >>> class Uniform(L.LightningModule):
        ...     def forward(self, ids):
        ...         return torch.zeros(*ids.shape, 256)
        >>> ll = next_token_log_likelihood(lambda s: list(s.encode()))
        >>> ll(Uniform(), ["abc", "abcd"])  # 2 and 3 predicted bytes, each at probability 1/256
        tensor([-11.0904, -16.6355])
    """
    if not callable(tokenize):
        raise TypeError(f"tokenize must be a function from a text to token ids, got {type(tokenize).__name__}")

    def log_likelihood(pl_module: pl.LightningModule, texts: list[str]) -> Tensor:
        tokens = [torch.as_tensor(tokenize(t), dtype=torch.long).flatten() for t in texts]
        if any(len(t) < 2 for t in tokens):
            raise ValueError("next_token_log_likelihood: every text must tokenize to at least 2 tokens.")
        lengths = torch.tensor([len(t) for t in tokens])
        ids = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True).to(pl_module.device)
        out = pl_module(ids[:, :-1])
        logits = getattr(out, "logits", out)
        if not (isinstance(logits, Tensor) and logits.shape[:2] == ids[:, :-1].shape):
            raise ValueError(
                "next_token_log_likelihood: the module's forward(ids) must return next-token logits of shape "
                f"(batch, time, vocab) = ({ids.shape[0]}, {ids.shape[1] - 1}, vocab); got "
                f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}. "
                "Pass CanaryExposure(log_likelihood=...) for another model interface."
            )
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :] < (lengths.to(ids.device)[:, None] - 1)
        return (logp * mask).sum(dim=1)

    return log_likelihood


class _WithCanaries(Dataset):
    """The user's training set followed by ``repetitions`` copies of each canary as examples.

    Canary items are encoded on access from the callback's current secrets, so a resumed run
    whose callback state was restored after the data was set up trains on the restored ones.
    """

    def __init__(self, base: Dataset, callback: CanaryExposure, encode: Callable[[str], Any]) -> None:
        self.base = base
        self.callback = callback
        self.encode = encode
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.base) + len(self.callback.canaries) * self.callback.repetitions  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self.base)  # type: ignore[arg-type]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} examples")
        if index < n:
            return self.base[index]
        text = self.callback.canaries[(index - n) // self.callback.repetitions]
        if text not in self._cache:
            self._cache[text] = self.encode(text)
        return self._cache[text]


class CanaryExposure(Callback):
    r"""Insert secret canaries into the training set and log their exposure (Carlini et al. 2019).

    ``num_canaries`` secrets are drawn from ``alphabet ** secret_length`` with this callback's
    own generator (``seed``), written into ``format``, and inserted into the training set by
    :meth:`insert` (``repetitions`` copies each; every copy is one training example, one
    privacy unit). At the end of ``fit``, and every ``every_n_epochs`` if set, each canary's
    exposure ``log2 |R| - log2 rank`` is measured (see :mod:`lightning_dp.lightning.canary` for the
    estimate and its ceiling) and logged to the Trainer's loggers as ``dp/canary_exposure``
    (the mean over canaries), ``dp/canary_exposure/<i>`` (each canary) and
    ``dp/canary_exposure/reference`` (the mean over ``num_references`` secrets drawn the same
    way but never inserted: what exposure looks like for text the model never saw).

    Works with any strategy: the non-private comparison run uses a plain Lightning strategy.
    At train start the callback checks that the training loader holds the dataset
    :meth:`insert` returned, and raises otherwise.

    The likelihood of a text comes from ``log_likelihood(pl_module, texts) -> Tensor``; or,
    for a module whose ``forward(ids)`` returns next-token logits, pass ``tokenize`` (text to
    token ids) and :func:`next_token_log_likelihood` is used.

    .. warning:: The secrets are in :meth:`state_dict`, so checkpoints hold them: a resumed run
       measures the same canaries, and anyone with the checkpoint can read them.

    Args:
        tokenize: text to token ids, for the default log-likelihood (exclusive with
            ``log_likelihood``).
        log_likelihood: ``(pl_module, texts) -> Tensor`` of shape ``(len(texts),)``: each
            text's log-likelihood under the model (exclusive with ``tokenize``). Called in
            eval mode without gradients, in batches of ``batch_size`` texts.
        format: the canary text, with one ``{secret}`` field.
        alphabet: the characters a secret is drawn from (distinct).
        secret_length: the number of characters in a secret; ``|R| = len(alphabet) **
            secret_length``.
        num_canaries: how many secrets are inserted.
        repetitions: how many training examples each inserted secret becomes.
        num_references: how many secrets of the same format are drawn but not inserted.
        num_candidates: how many random candidates estimate a rank; when ``|R|`` is at most
            this, all ``|R|`` candidates are scored and ranks are exact.
        every_n_epochs: also measure at the end of every ``n``-th training epoch (``None``:
            only at the end of ``fit``).
        batch_size: texts per ``log_likelihood`` call.
        seed: seeds the secrets and the candidate draws (this callback's own generator; the
            training's random state is untouched).

    Attributes:
        canaries: the inserted canary texts.
        references: the never-inserted reference texts.
        exposures: each canary's latest exposure in bits (empty before the first measurement).
        reference_exposures: each reference's latest exposure.
        ceiling: the largest exposure the measurement can report.

    Example:
        >>> canary = CanaryExposure(tokenize=lambda s: list(s.encode()), num_canaries=2, repetitions=3, seed=0)
        >>> len(canary.canaries), canary.canaries[0].startswith("my number is ")
        (2, True)
        >>> train_set = canary.insert([[1, 2, 3]] * 10, encode=lambda s: list(s.encode())[:3])
        >>> len(train_set)  # 10 examples and 2 canaries x 3 repetitions
        16
        >>> round(canary.ceiling, 2)  # log2(4096 + 1): 4096 random candidates out of 10**6
        12.0

    Then ``Trainer(callbacks=[canary]).fit(model, DataLoader(train_set, ...))``; afterwards
    ``canary.exposures`` holds each canary's exposure.
    """

    def __init__(
        self,
        tokenize: Optional[Callable[[str], Union[Sequence[int], Tensor]]] = None,
        log_likelihood: Optional[LogLikelihood] = None,
        format: str = "my number is {secret}",
        alphabet: str = string.digits,
        secret_length: int = 6,
        num_canaries: int = 1,
        repetitions: int = 10,
        num_references: int = 16,
        num_candidates: int = 4096,
        every_n_epochs: Optional[int] = None,
        batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        if (tokenize is None) == (log_likelihood is None):
            raise ValueError(
                "CanaryExposure needs exactly one of tokenize= (text -> token ids, for a module whose forward "
                "returns next-token logits) or log_likelihood= ((pl_module, texts) -> Tensor of log-likelihoods)."
            )
        if log_likelihood is not None and not callable(log_likelihood):
            raise TypeError(f"log_likelihood must be callable, got {type(log_likelihood).__name__}")
        fields = [f for _, f, _, _ in string.Formatter().parse(format) if f is not None] if isinstance(format, str) else None
        if fields != ["secret"]:
            raise ValueError(f"format must be a string with exactly one '{{secret}}' field and no other, got {format!r}")
        if format.startswith("{secret}"):
            # The likelihood scores tokens after the first: the secret's first character would go unscored.
            raise ValueError(f"format must start with some text before '{{secret}}' (e.g. 'my number is {{secret}}'), got {format!r}")
        if not (isinstance(alphabet, str) and len(alphabet) >= 2 and len(set(alphabet)) == len(alphabet)):
            raise ValueError(f"alphabet must be a string of at least 2 distinct characters, got {alphabet!r}")
        for name, value, low in (
            ("secret_length", secret_length, 1),
            ("num_canaries", num_canaries, 1),
            ("repetitions", repetitions, 1),
            ("num_references", num_references, 0),
            ("num_candidates", num_candidates, 1),
            ("batch_size", batch_size, 1),
        ):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if every_n_epochs is not None and not (
            isinstance(every_n_epochs, int) and not isinstance(every_n_epochs, bool) and every_n_epochs >= 1
        ):
            raise ValueError(f"every_n_epochs must be None or an int >= 1, got {every_n_epochs!r}")
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        space = len(alphabet) ** secret_length
        if num_canaries + num_references > space:
            raise ValueError(
                f"num_canaries + num_references = {num_canaries + num_references} distinct secrets do not fit in the "
                f"{space} candidates of {secret_length} characters from {alphabet!r}; lengthen the secret."
            )
        self.log_likelihood: LogLikelihood = log_likelihood or next_token_log_likelihood(tokenize)  # type: ignore[arg-type]
        self.format = format
        self.alphabet = alphabet
        self.secret_length = secret_length
        self.repetitions = repetitions
        self.num_candidates = num_candidates
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.exact = space <= num_candidates
        self._generator = torch.Generator().manual_seed(seed)
        drawn = self._distinct_secrets(num_canaries + num_references)
        self._secrets: list[int] = drawn[:num_canaries]
        self._reference_secrets: list[int] = drawn[num_canaries:]
        self._dataset: Optional[_WithCanaries] = None
        self._measurements = 0
        self._measured_at_step: Optional[int] = None
        self.exposures: list[float] = []
        self.reference_exposures: list[float] = []

    # ------------------------------------------------------------------ the secrets
    @property
    def space_size(self) -> int:
        """``|R|``: the number of possible secrets."""
        return len(self.alphabet) ** self.secret_length

    @property
    def ceiling(self) -> float:
        """The largest exposure the measurement reports: ``log2 |R|`` when every candidate is
        scored (less ``log2`` of the other inserted canaries, which are not candidates), else
        ``log2(num_candidates + 1)``."""
        return math.log2(self.space_size) if self.exact else math.log2(self.num_candidates + 1)

    @property
    def canaries(self) -> list[str]:
        return [self._text(s) for s in self._secrets]

    @property
    def references(self) -> list[str]:
        return [self._text(s) for s in self._reference_secrets]

    def _text(self, secret: int) -> str:
        chars = []
        for _ in range(self.secret_length):
            secret, digit = divmod(secret, len(self.alphabet))
            chars.append(self.alphabet[digit])
        return self.format.format(secret="".join(reversed(chars)))

    def _random_secrets(self, n: int, generator: torch.Generator) -> list[int]:
        # Uniform over |R| even beyond int64: compose base-|alphabet| digits.
        digits = torch.randint(len(self.alphabet), (n, self.secret_length), generator=generator).tolist()
        out = []
        for row in digits:
            value = 0
            for d in row:
                value = value * len(self.alphabet) + d
            out.append(value)
        return out

    def _distinct_secrets(self, n: int) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < n:
            for s in self._random_secrets(n - len(chosen), self._generator):
                if s not in chosen:
                    chosen.append(s)
        return chosen[:n]

    # ------------------------------------------------------------------ insertion
    def insert(self, train_set: Dataset, encode: Callable[[str], Any]) -> Dataset:
        """The training set plus ``repetitions`` copies of each canary, encoded as training examples.

        Train on the returned dataset itself (the Trainer's training loader must hold it, not
        a subset or another wrapper of it); the canaries follow the original examples.

        Args:
            train_set: a map-style dataset (with ``__len__`` and ``__getitem__``).
            encode: a canary text to one training example, in the same form as
                ``train_set``'s items (e.g. token ids padded to the block length).

        Raises:
            TypeError: for an iterable-style or unsized dataset, or a non-callable ``encode``.
        """
        if isinstance(train_set, IterableDataset) or not hasattr(train_set, "__len__") or not hasattr(
            train_set, "__getitem__"
        ):
            raise TypeError(
                f"CanaryExposure.insert needs a map-style dataset (with __len__ and __getitem__), got "
                f"{type(train_set).__name__}."
            )
        if not callable(encode):
            raise TypeError(f"encode must be a function from a canary text to a training example, got {encode!r}")
        self._dataset = _WithCanaries(train_set, self, encode)
        return self._dataset

    @property
    def canary_indices(self) -> list[int]:
        """The indices of the canary examples in the dataset :meth:`insert` returned."""
        if self._dataset is None:
            return []
        n = len(self._dataset.base)  # type: ignore[arg-type]
        return list(range(n, len(self._dataset)))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dataset is None:
            raise ValueError(
                "CanaryExposure: no canaries were inserted. In the data code, train on "
                "`train_set = canary.insert(train_set, encode=...)`; otherwise the exposure measured would be "
                "that of secrets the model never saw."
            )
        datasets = [getattr(loader, "dataset", None) for loader in _loaders(trainer.train_dataloader)]
        if not any(d is self._dataset for d in datasets):
            raise ValueError(
                "CanaryExposure: the training loader does not hold the dataset canary.insert(...) returned "
                f"(it holds {', '.join(type(d).__name__ for d in datasets) or 'no dataset'}), so the canaries are "
                "not trained on. Pass the returned dataset itself to the training DataLoader (not a subset, copy "
                "or another wrapper)."
            )
        rank_zero_info(
            f"CanaryExposure: {len(self._secrets)} canaries x {self.repetitions} repetitions in a training set of "
            f"{len(self._dataset)} examples; {len(self._reference_secrets)} references; exposure ceiling "
            f"{self.ceiling:.2f} bits ({'all' if self.exact else self.num_candidates} of {self.space_size} candidates)."
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._measured_at_step != trainer.global_step:
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float]:
        """Measure every canary's and reference's exposure now, store and log them.

        Returns:
            The canaries' exposures in bits (also in :attr:`exposures`).
        """
        scores = self._exposures(pl_module)
        self.exposures = scores[: len(self._secrets)]
        self.reference_exposures = scores[len(self._secrets) :]
        self._measured_at_step = trainer.global_step
        metrics = {"dp/canary_exposure": sum(self.exposures) / len(self.exposures)}
        metrics.update({f"dp/canary_exposure/{i}": e for i, e in enumerate(self.exposures)})
        if self.reference_exposures:
            metrics["dp/canary_exposure/reference"] = sum(self.reference_exposures) / len(self.reference_exposures)
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:  # self.log is not allowed at fit end
            logger.log_metrics(metrics, step=trainer.global_step)
        reference = metrics.get("dp/canary_exposure/reference")
        rank_zero_info(
            f"CanaryExposure (epoch {trainer.current_epoch}, step {trainer.global_step}): mean exposure "
            f"{metrics['dp/canary_exposure']:.2f} bits"
            + (f" (never-inserted references: {reference:.2f})" if reference is not None else "")
            + f"; ceiling {self.ceiling:.2f}."
        )
        return self.exposures

    # ------------------------------------------------------------------ the measurement
    def _exposures(self, pl_module: pl.LightningModule) -> list[float]:
        secrets = self._secrets + self._reference_secrets
        # A fresh stream per measurement, reproducible from the seed, independent of training.
        generator = torch.Generator().manual_seed(hash((self.seed, self._measurements)) & (2**63 - 1))
        self._measurements += 1
        candidates = (
            list(range(self.space_size)) if self.exact else self._random_secrets(self.num_candidates, generator)
        )
        mode = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                own = self._score([self._text(s) for s in secrets], pl_module)
                others = self._score([self._text(c) for c in candidates], pl_module)
        finally:
            pl_module.train(mode)
        drawn = torch.tensor(candidates)
        # The other inserted canaries are not candidates: a memorised one would outrank every
        # secret, pushing each canary's (and reference's) rank down by as many as were inserted.
        inserted = torch.isin(drawn, torch.tensor(self._secrets))
        exposures = []
        for secret, score in zip(secrets, own.tolist()):
            # The secret against the other candidates (a draw may repeat it); ties count
            # against it, so the estimate errs low, never high.
            others_mask = (drawn != secret) & ~inserted
            k = int((others[others_mask] >= score).sum())
            # Exact: k + 1 is the rank among the m + 1 candidates (|R| for a single canary).
            # Sampled: (k + 1) / (m + 1) estimates rank / |R|.
            exposures.append(math.log2(int(others_mask.sum()) + 1) - math.log2(k + 1))
        return exposures

    def _score(self, texts: list[str], pl_module: pl.LightningModule) -> Tensor:
        parts = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            scores = self.log_likelihood(pl_module, chunk)
            if not (isinstance(scores, Tensor) and scores.shape == (len(chunk),)):
                raise ValueError(
                    f"log_likelihood must return a tensor of shape ({len(chunk)},), one log-likelihood per text; got "
                    f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
                )
            parts.append(scores.detach().double().cpu())
        return torch.cat(parts)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "alphabet": self.alphabet,
            "secret_length": self.secret_length,
            "secrets": list(self._secrets),
            "reference_secrets": list(self._reference_secrets),
            "exposures": list(self.exposures),
            "reference_exposures": list(self.reference_exposures),
            "measurements": self._measurements,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["format"], state_dict["alphabet"], state_dict["secret_length"])
        if saved != (self.format, self.alphabet, self.secret_length):
            raise ValueError(
                f"CanaryExposure: the checkpoint's canaries have format, alphabet, secret_length = {saved}, this "
                f"callback {(self.format, self.alphabet, self.secret_length)}; construct it with the checkpoint's."
            )
        if len(state_dict["secrets"]) != len(self._secrets):
            raise ValueError(
                f"CanaryExposure: the checkpoint has {len(state_dict['secrets'])} canaries, this callback "
                f"num_canaries={len(self._secrets)}; the training set was built for the latter."
            )
        self._secrets = [int(s) for s in state_dict["secrets"]]
        self._reference_secrets = [int(s) for s in state_dict["reference_secrets"]]
        self.exposures = [float(e) for e in state_dict["exposures"]]
        self.reference_exposures = [float(e) for e in state_dict["reference_exposures"]]
        self._measurements = int(state_dict["measurements"])
        if self._dataset is not None:
            self._dataset._cache.clear()


def _loaders(loaders: Any) -> list[Any]:
    """The DataLoaders in whatever a Trainer's ``train_dataloader`` holds (one, or a collection)."""
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        return [d for v in loaders.values() for d in _loaders(v)]
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)):
        return [d for v in loaders for d in _loaders(v)]
    flattened = getattr(loaders, "flattened", None)  # a CombinedLoader
    return list(flattened) if flattened is not None else [loaders]
