"""Exact float32 arithmetic for the steps whose rounding the privacy guarantee bounds.

The clipped sum must hold each example's contribution to the clip norm, and ghost clipping's
norm bounds (:mod:`lightning_dp.mechanism.grads.ghost_grads`) assume IEEE float32 products with
gradual underflow. Process-wide switches that users set for speed change both; this context
puts them back for the duration of the private arithmetic, and restores them after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["exact_arithmetic"]

_exact = threading.local()


def _flushes_subnormals() -> bool:
    """Whether this thread flushes subnormal float32 results to zero (``torch.set_flush_denormal``,
    which has no getter): ``1e-20 ** 2`` is ``1e-40``, a subnormal, unless flushed."""
    tiny = torch.tensor(1e-20, dtype=torch.float32)
    return bool(tiny * tiny == 0)


@contextmanager
def exact_arithmetic() -> Iterator[None]:
    """IEEE float32 arithmetic with gradual underflow, whatever the process has set: the clipped
    sum and the ghost norm bounds assume both, and three global switches void them (an
    adversarial review of 2026-12-01 released 1.0076 C and 82 C through the first and the last):

    * ``torch.set_float32_matmul_precision("high" | "medium")``: float32 products in bf16 on CPUs
      with AMX, in TF32 on CUDA (8 and 10 bits of mantissa);
    * ``torch.backends.cuda.matmul.allow_tf32``;
    * ``torch.set_flush_denormal(True)``: subnormal results become zero, an error the underflow
      term (the smallest subnormal per operation) does not cover.

    Each is restored on exit."""
    if getattr(_exact, "active", False):  # nested: already in force
        yield
        return
    precision = torch.get_float32_matmul_precision()
    backends = [b for b in (getattr(torch.backends.mkldnn, "matmul", None), getattr(torch.backends.cuda, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    fp32 = [b.fp32_precision for b in backends]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    flushing = _flushes_subnormals()
    torch.set_float32_matmul_precision("highest")
    for b in backends:
        b.fp32_precision = "ieee"
    torch.backends.cuda.matmul.allow_tf32 = False
    if flushing:
        torch.set_flush_denormal(False)
    _exact.active = True
    try:
        yield
    finally:
        _exact.active = False
        if flushing:
            torch.set_flush_denormal(True)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)
        for b, value in zip(backends, fp32):
            b.fp32_precision = value
