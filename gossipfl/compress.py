"""Compression of a model delta: top-k sparsification and block-scaled quantization.

What is compressed is the gap between a node's model and the public copy a peer holds
of it (see ``gossip``). The naive way sends that gap densely as float32: 4 bytes per
parameter per exchange. The chosen way keeps only the ``k`` entries of largest
magnitude (a large negative entry is as important as a large positive one), groups
the kept values into blocks of ``block`` consecutive entries, and stores each as an
int8 (or int4) multiple of its block's float32 scale, rounded stochastically so that
the expected decoded value equals the true one (Alistarh et al., "QSGD", 2017;
stochastic rounding as in Gupta et al., 2015). What is not sent is not lost: it stays
in the gap, so the next exchange carries it (error feedback; Stich et al., "Sparsified
SGD with memory", 2018; Koloskova et al., "CHOCO-SGD", 2019).

Left out on purpose: randomised top-k and per-layer budgets. One global top-k over the
flat vector is the simplest rule with the best measured bytes-to-accuracy on small
models; a layer-aware budget is the first thing to try on very unbalanced models.

Rounding is done in float64 and the decoded value of entry ``i`` of block ``b`` is
``float32(q[i]) * scales[b]``, one float32 multiply, so sender and receiver compute the
same bits (see docs/wire-format.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import ConfigError

F32 = npt.NDArray[np.float32]

MAX_BLOCK = 65535  # the wire format stores the block size in 16 bits


class Codec(enum.IntEnum):
    """Value codecs; the numbers are wire-format ids."""

    DENSE_F32 = 0
    TOPK_INT8 = 1
    TOPK_INT4 = 2


CODEC_NAMES = {"none": Codec.DENSE_F32, "topk-int8": Codec.TOPK_INT8,
               "topk-int4": Codec.TOPK_INT4}

# The largest quantized magnitude per codec: int8 uses -127..127 and int4 -7..7, so
# that zero is exact and the range is symmetric (-128 and -8 are never produced).
QMAX = {Codec.TOPK_INT8: 127, Codec.TOPK_INT4: 7}


@dataclass(frozen=True)
class CompressionSpec:
    codec: Codec
    fraction: float = 0.01
    block: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"topk_fraction {self.fraction} is outside (0, 1]")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ConfigError(f"block size {self.block} is outside 1..{MAX_BLOCK}")

    @classmethod
    def from_name(cls, name: str, fraction: float = 0.01, block: int = 64
                  ) -> CompressionSpec:
        try:
            codec = CODEC_NAMES[name]
        except KeyError:
            known = ", ".join(sorted(CODEC_NAMES))
            raise ConfigError(f"compression {name!r} is not one of {known}") from None
        return cls(codec, fraction, block)

    def k_for(self, dim: int) -> int:
        """How many entries a message of a ``dim``-vector carries at most."""
        if self.codec is Codec.DENSE_F32:
            return dim
        return max(1, min(dim, round(self.fraction * dim)))


@dataclass(frozen=True)
class Compressed:
    """A compressed delta, ready for the codec and for the sender's own bookkeeping.

    ``indices`` are sorted and unique. For the dense codec ``indices`` is every
    position and ``quantized`` is None. ``values`` are the decoded float32 values,
    exactly what the receiver will reconstruct.
    """

    codec: Codec
    dim: int
    indices: npt.NDArray[np.int64]
    values: F32
    quantized: npt.NDArray[np.int8] | None
    scales: F32 | None
    block: int


def top_k(delta: F32, k: int) -> npt.NDArray[np.int64]:
    """Sorted positions of the ``k`` largest magnitudes, exact zeros left out."""
    if k >= delta.size:
        chosen = np.arange(delta.size, dtype=np.int64)
    else:
        magnitude = np.abs(delta)
        chosen = np.argpartition(magnitude, delta.size - k)[delta.size - k:]
        chosen = chosen.astype(np.int64)
    kept: npt.NDArray[np.int64] = np.sort(chosen[delta[chosen] != 0])
    return kept


def block_scales(picked: F32, block: int, qmax: int) -> F32:
    """One float32 scale per block, the smallest with every ``|v| / scale <= qmax``."""
    nblocks = -(-picked.size // block)
    padded = np.zeros(nblocks * block, dtype=np.float64)
    padded[: picked.size] = np.abs(picked)
    peak = padded.reshape(nblocks, block).max(axis=1)
    scales = (peak / qmax).astype(np.float32)
    # Rounding to float32 may have made a scale a hair too small; step it up.
    low = peak / np.maximum(scales.astype(np.float64), np.finfo(np.float64).tiny)
    too_small = (scales > 0) & (low > qmax)
    scales[too_small] = np.nextafter(scales[too_small], np.float32(np.inf))
    out: F32 = scales
    return out


def quantize(picked: F32, scales: F32, block: int, qmax: int,
             rng: np.random.Generator) -> npt.NDArray[np.int8]:
    """Stochastic rounding of ``picked / scale`` to integers in ``[-qmax, qmax]``."""
    per_entry = np.repeat(scales.astype(np.float64), block)[: picked.size]
    ratio = np.divide(picked.astype(np.float64), per_entry,
                      out=np.zeros(picked.size), where=per_entry > 0)
    rounded = np.floor(ratio + rng.random(picked.size))
    return np.clip(rounded, -qmax, qmax).astype(np.int8)


def dequantize(quantized: npt.NDArray[np.int8], scales: F32, block: int) -> F32:
    """The float32 values a receiver reconstructs: ``float32(q) * scale``."""
    per_entry = np.repeat(scales, block)[: quantized.size]
    out: F32 = quantized.astype(np.float32) * per_entry
    return out


def compress(delta: F32, spec: CompressionSpec, rng: np.random.Generator) -> Compressed:
    """Compress ``delta`` (a float32 vector) according to ``spec``."""
    if spec.codec is Codec.DENSE_F32:
        values = np.ascontiguousarray(delta, dtype=np.float32).copy()
        return Compressed(spec.codec, delta.size,
                          np.arange(delta.size, dtype=np.int64), values,
                          None, None, 0)

    indices = top_k(delta, spec.k_for(delta.size))
    picked = delta[indices].astype(np.float32)
    qmax = QMAX[spec.codec]
    scales = block_scales(picked, spec.block, qmax)
    quantized = quantize(picked, scales, spec.block, qmax, rng)
    values = dequantize(quantized, scales, spec.block)
    return Compressed(spec.codec, delta.size, indices, values, quantized, scales,
                      spec.block)


def densify(compressed: Compressed) -> F32:
    """The compressed delta as a dense float32 vector (tests and diagnostics)."""
    out = np.zeros(compressed.dim, dtype=np.float32)
    out[compressed.indices] = compressed.values
    return out
