"""Messages for the merge tests: honest ones from the encoder, and hand-built ones.

``assemble`` signs arbitrary section contents under a header that describes them,
so a test can hand the merge a message whose header parses but whose payload is
broken in exactly one way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gossipfl import codec
from gossipfl.codec import HEADER, MAGIC, VERSION, Header, Kind
from gossipfl.compress import F32, Codec, Compressed, CompressionSpec, compress
from gossipfl.errors import DecodeError, MessageRefused
from gossipfl.identity import Identity
from gossipfl.merge import Batch, MergeFn

IDENTITY = Identity.from_seed(bytes(range(32)))
RECEIVER = bytes(32)
MANIFEST = bytes(16)
GUARD = 64  # float32 entries either side of a target, to catch stray writes
GUARD_BITS = 0x7FC0DEAD  # a NaN payload no merge produces


def c_required() -> bool:
    """True where the C kernel must have been built (CI, or asked for)."""
    return (os.environ.get("GOSSIPFL_REQUIRE_C", "") not in ("", "0")
            or os.environ.get("CI", "").lower() == "true")


def encode(compressed: Compressed, flags: int = 0) -> tuple[bytes, Header]:
    data = codec.encode_message(IDENTITY, compressed, kind=Kind.REQUEST,
                                receiver=RECEIVER, round=7, epoch=1, seq=2,
                                manifest=MANIFEST, flags=flags)
    return data, codec.parse_header(data, codec.max_message_bytes(compressed.dim))


def random_message(rng: np.random.Generator, dim: int, fraction: float,
                   codec_name: str = "topk-int8", block: int = 64
                   ) -> tuple[Compressed, bytes, Header]:
    spec = CompressionSpec.from_name(codec_name, fraction, block)
    delta = (rng.standard_normal(dim) * rng.uniform(1e-3, 10)).astype(np.float32)
    compressed = compress(delta, spec, rng)
    data, header = encode(compressed)
    return compressed, data, header


def assemble(codec_id: int, dim: int, nnz: int, block: int, rice: int,
             unary: bytes, low: bytes, values: bytes, scales: bytes
             ) -> tuple[bytes, Header]:
    """A signed message with these sections, and its parsed header."""
    head = HEADER.pack(MAGIC, VERSION, Kind.REQUEST, codec_id, 0,
                       IDENTITY.public_key, RECEIVER, 7, 1, 2, MANIFEST,
                       dim, nnz, block, rice, 0, len(unary), len(low))
    body = b"".join((head, unary, low, values, scales))
    data = body + IDENTITY.sign(body)
    return data, codec.parse_header(data, codec.max_message_bytes(dim))


def sparse(indices: Sequence[int], dim: int, quantized: Sequence[int],
           scales: Sequence[float], block: int, codec_id: int = Codec.TOPK_INT8
           ) -> tuple[bytes, Header]:
    """A hand-built top-k message with exactly these indices, values and scales."""
    rice, unary, low = codec.encode_indices(np.asarray(indices, dtype=np.int64))
    q = np.asarray(quantized, dtype=np.int8)
    values = codec.pack_int4(q) if codec_id == Codec.TOPK_INT4 else q.tobytes()
    return assemble(codec_id, dim, len(indices), block, rice, unary, low, values,
                    np.asarray(scales, dtype="<f4").tobytes())


@dataclass(frozen=True)
class Outcome:
    """What one merge call did: the target's bits, or the refusal it raised."""

    bits: bytes | None
    refusal: tuple[str, str, int | None, str] | None

    @property
    def accepted(self) -> bool:
        return self.refusal is None


def guarded(target: F32) -> tuple[npt.NDArray[np.float32], F32]:
    """A copy of ``target`` inside a buffer with guard entries either side."""
    buffer = np.empty(target.size + 2 * GUARD, dtype=np.float32)
    buffer.view(np.uint32)[:] = GUARD_BITS
    inner = buffer[GUARD:GUARD + target.size]
    inner[:] = target
    return buffer, inner


def run(merge: MergeFn, target: F32, batch: Batch, weights: Sequence[float]
        ) -> Outcome:
    """Merge into a guarded copy of ``target``; check nothing else was written."""
    buffer, inner = guarded(target)
    before = [bytes(data) for data, _ in batch]
    refusal: tuple[str, str, int | None, str] | None = None
    try:
        merge(inner, batch, weights)
    except MessageRefused as exc:
        offset = exc.offset if isinstance(exc, DecodeError) else None
        refusal = (type(exc).__name__, exc.reason, offset, str(exc))
        assert inner.tobytes() == target.tobytes(), "refused, yet target changed"
    guard = buffer.view(np.uint32)
    assert (guard[:GUARD] == GUARD_BITS).all(), "write before the target"
    assert (guard[GUARD + target.size:] == GUARD_BITS).all(), "write past the target"
    assert [bytes(data) for data, _ in batch] == before, "message bytes changed"
    return Outcome(None if refusal else inner.tobytes(), refusal)
