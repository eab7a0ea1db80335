"""Folding decoded deltas into a float32 vector: ``target += sum_m w_m * delta_m``.

This is the one hot loop a node runs for every message it receives. There are two
implementations of exactly the same function:

* ``merge_numpy``, the reference: decode each message with ``codec.decode_delta``
  (vectorised Rice decoding, dequantisation), then scatter-add.
* ``gossipfl._merge.merge``, a C kernel against the numpy C API that fuses decoding,
  dequantisation and the scatter-add in one pass per message, with the GIL released.

Both validate every message of a batch before the first write, so a batch with one
bad message leaves ``target`` untouched, and both raise the same ``DecodeError`` /
``MessageRefused`` for the same bad input. Each decoded value is
``float32(q) * scale`` and is added as ``target[i] += float32(w) * value`` in message
order, so the two paths agree bit for bit (the C kernel is built without FMA
contraction for that reason).

``GOSSIPFL_MERGE=numpy`` forces the reference; ``GOSSIPFL_MERGE=c`` makes a missing
C kernel an error instead of a fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

from .codec import Header, decode_delta
from .compress import F32, Codec
from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "GOSSIPFL_MERGE"

Batch = Sequence[tuple[bytes, Header]]
MergeFn = Callable[[F32, Batch, Sequence[float]], None]


def check_target(target: F32) -> None:
    """Refuse a target the kernel cannot write in place."""
    if not isinstance(target, np.ndarray) or target.dtype != np.float32:
        raise TypeError(f"merge target must be a float32 array, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    flags = target.flags
    if target.ndim != 1 or not (flags.c_contiguous and flags.writeable
                                and flags.aligned):
        raise ValueError("merge target must be a writeable, aligned, contiguous "
                         "1-d array")


def check_batch(target: F32, batch: Batch, weights: Sequence[float]) -> None:
    if len(batch) != len(weights):
        raise ValueError(f"{len(batch)} messages but {len(weights)} weights")
    for _, header in batch:
        if header.dim != target.size:
            raise ValueError(f"message dimension {header.dim} does not match the "
                             f"target's {target.size}")


def merge_numpy(target: F32, batch: Batch, weights: Sequence[float]) -> None:
    """Reference: ``target += sum w * delta`` for each verified message."""
    check_target(target)
    check_batch(target, batch, weights)
    decoded = [decode_delta(data, header) for data, header in batch]
    for (_, header), (indices, values), weight in zip(batch, decoded, weights,
                                                      strict=True):
        scaled = np.float32(weight) * values
        if header.codec is Codec.DENSE_F32:
            target += scaled
        else:
            target[indices] += scaled


def c_merge() -> MergeFn | None:
    """The C kernel behind the same checks as ``merge_numpy``; None if not built."""
    try:
        from . import _merge  # type: ignore[attr-defined]
    except ImportError as exc:
        log.debug("C merge kernel not available: %s", exc)
        return None
    kernel: Callable[[F32, Batch, Sequence[float]], None] = _merge.merge

    def merge_c(target: F32, batch: Batch, weights: Sequence[float]) -> None:
        check_target(target)
        check_batch(target, batch, weights)
        kernel(target, batch, weights)

    return merge_c


def select() -> tuple[str, MergeFn]:
    """The merge path this process uses, ``("c" | "numpy", function)``, honouring
    ``GOSSIPFL_MERGE``; the daemon logs the name at start-up and shows it in
    status."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower()
    if wanted not in ("auto", "c", "numpy"):
        raise ConfigError(f"{ENV_VAR}={wanted!r} is not one of auto, c, numpy")
    if wanted == "numpy":
        return "numpy", merge_numpy
    merge_c = c_merge()
    if merge_c is None:
        if wanted == "c":
            raise ConfigError(f"{ENV_VAR}=c but the C merge kernel gossipfl._merge "
                              "is not built")
        return "numpy", merge_numpy
    return "c", merge_c
