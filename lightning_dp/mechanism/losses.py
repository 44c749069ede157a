"""Per-example losses for models whose usual loss mixes the examples of a batch.

Hugging Face's causal LMs compute ``model(**batch).loss`` as the mean over every predicted
token of the batch: a sequence's weight then depends on the other sequences' lengths, so one
example's gradient depends on the others and per-example clipping no longer bounds its
influence (the start-of-fit check refuses it). :func:`causal_lm_loss` is the per-example
version: each sequence's mean over its own predicted tokens, then the mean over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_lm_loss"]


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = True) -> Tensor:
    """Next-token cross-entropy with one term per sequence: each sequence's mean over its own
    predicted tokens (those whose label is not ``ignore_index``), then the mean over the batch.

    Args:
        logits: ``(batch, length, vocab)``, what the model returns.
        labels: ``(batch, length)`` token ids, ``ignore_index`` (-100, Hugging Face's
            convention) at padding and at any position not to learn.
        ignore_index: the label of positions to leave out.
        shift: predict ``labels[:, t + 1]`` from ``logits[:, t]``, as Hugging Face's models do
            when given ``labels`` (``labels`` are then the input ids with padding masked);
            ``False`` when the labels are already aligned with the logits.

    A sequence without any predicted token contributes 0, not NaN.

    Example:
        >>> logits = torch.zeros(2, 4, 3)  # uniform over 3 tokens: each token costs log 3
        >>> labels = torch.tensor([[1, 2, 0, -100], [2, 1, -100, -100]])  # lengths 3 and 2
        >>> round(float(causal_lm_loss(logits, labels)), 4)  # (log 3 + log 3) / 2
        1.0986
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal_lm_loss needs logits (batch, length, vocab) and labels (batch, length); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    counted = labels != ignore_index
    # Ignored positions get zero logits before the loss (torch.where, whose backward is NaN-safe):
    # a NaN or inf logit there (a fully masked left-padding row) would otherwise make the example's
    # gradient NaN (0 * NaN in log_softmax's backward), and the example would be dropped as
    # non-finite. Shapes stay fixed, so vmap (the functorch engine) can run it.
    safe_logits = torch.where(counted.unsqueeze(-1), logits.float(), torch.zeros((), device=logits.device))
    safe_labels = torch.where(counted, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    token_losses = torch.nn.functional.cross_entropy(
        safe_logits.reshape(-1, logits.shape[-1]), safe_labels.reshape(-1), reduction="none"
    ).view(labels.shape)
    weights = counted.to(token_losses.dtype)
    per_sequence = (token_losses * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return per_sequence.mean()
