"""The wire message: one signed, versioned, compressed delta (docs/wire-format.md).

Every message a peer can send is parsed here, in this order, and nothing is acted on
before the step that clears it:

1. size cap, before a byte is interpreted (``parse_header``);
2. fixed header: magic, version, kind, codec, and the section lengths it declares,
   which must add up to exactly the bytes received;
3. the Ed25519 signature over everything before it, with the sender's key
   (``verify_signature``; the caller looks the key up and refuses strangers);
4. the payload, fully validated before anything is written (``decode_delta``): every
   index in range, canonical index coding, finite scales and values.

Indices are coded as Golomb-Rice gaps split into two streams, the unary high parts
and the fixed-width low parts, so that both the numpy reference and the C kernel decode
them without a bit-serial loop. The Rice parameter is chosen per message to minimise
the coded size; this lands within a few percent of log2(C(d, k)) / k bits per index.

Decoding here is the numpy reference; ``merge`` holds the fused C path that must agree
with it bit for bit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .compress import F32, QMAX, Codec, Compressed
from .errors import DecodeError, MessageRefused
from .identity import SIGNATURE_BYTES, Identity, verify

MAGIC = b"GFLD"
VERSION = 1
MAX_RICE = 31

FLAG_RESET = 0x01  # the sender restarts this edge at the message's epoch
KNOWN_FLAGS = FLAG_RESET

# magic, version, kind, codec, flags, sender, receiver, round, epoch, seq,
# manifest, dim, nnz, block, rice, reserved, unary_len, low_len
HEADER = struct.Struct("<4sBBBB32s32sQII16sIIHBBII")
HEADER_BYTES = HEADER.size  # 124
OVERHEAD_BYTES = HEADER_BYTES + SIGNATURE_BYTES
MANIFEST_BYTES = 16


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


@dataclass(frozen=True)
class Header:
    kind: Kind
    codec: Codec
    flags: int
    sender: bytes
    receiver: bytes
    round: int
    epoch: int
    seq: int
    manifest: bytes
    dim: int
    nnz: int
    block: int
    rice: int
    unary_len: int
    low_len: int

    @property
    def values_len(self) -> int:
        if self.codec is Codec.DENSE_F32:
            return 4 * self.dim
        if self.codec is Codec.TOPK_INT4:
            return (self.nnz + 1) // 2
        return self.nnz

    @property
    def nblocks(self) -> int:
        if self.codec is Codec.DENSE_F32 or self.nnz == 0:
            return 0
        return -(-self.nnz // self.block)

    # Section offsets from the start of the message.
    @property
    def unary_off(self) -> int:
        return HEADER_BYTES

    @property
    def low_off(self) -> int:
        return HEADER_BYTES + self.unary_len

    @property
    def values_off(self) -> int:
        return self.low_off + self.low_len

    @property
    def scales_off(self) -> int:
        return self.values_off + self.values_len

    @property
    def signature_off(self) -> int:
        return self.scales_off + 4 * self.nblocks

    @property
    def total_len(self) -> int:
        return self.signature_off + SIGNATURE_BYTES

    @property
    def reset(self) -> bool:
        return bool(self.flags & FLAG_RESET)


def dense_message_bytes(dim: int) -> int:
    """The size of a dense float32 message of a ``dim``-vector."""
    return OVERHEAD_BYTES + 4 * dim


def max_message_bytes(dim: int) -> int:
    """The largest message an honest sender makes for a ``dim``-vector.

    That is not the dense one (4 bytes an entry) but top-k at full density with
    block size 1: an int8 value and a float32 scale per entry, and index streams of
    at most ``dim`` bits together (the chosen Rice parameter codes the gaps in no
    more bits than parameter 0 does, which takes one bit per position), each
    stream rounded up to a whole byte.
    """
    return OVERHEAD_BYTES + 5 * dim + dim // 8 + 2


# --- encoding -------------------------------------------------------------------


def rice_parameter(gaps: npt.NDArray[np.int64]) -> int:
    """The Rice parameter that codes ``gaps`` in the fewest bits."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    guess = max(0, int(np.log2(mean * 0.69 + 1.0)))
    best, best_bits = 0, None
    # Parameter 0 is always a candidate: it bounds the size (one bit a position),
    # which max_message_bytes relies on.
    for b in (0, *range(max(1, guess - 2), min(MAX_RICE, guess + 2) + 1)):
        bits = int((gaps >> b).sum()) + gaps.size * (1 + b)
        if best_bits is None or bits < best_bits:
            best, best_bits = b, bits
    return best


def encode_indices(indices: npt.NDArray[np.int64]) -> tuple[int, bytes, bytes]:
    """Rice parameter, unary stream and low stream for sorted unique ``indices``."""
    gaps = np.diff(indices, prepend=-1) - 1
    b = rice_parameter(gaps)
    high = gaps >> b
    ones = np.cumsum(high + 1) - 1
    unary_bits = np.zeros(int(ones[-1]) + 1 if ones.size else 0, dtype=np.uint8)
    unary_bits[ones] = 1
    unary = np.packbits(unary_bits).tobytes()
    if b == 0:
        return b, unary, b""
    low = gaps & ((1 << b) - 1)
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
    low_bits = ((low[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return b, unary, np.packbits(low_bits).tobytes()


def pack_int4(quantized: npt.NDArray[np.int8]) -> bytes:
    """Two int4 values per byte, the earlier one in the low nibble."""
    nibbles = (quantized.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def encode_message(identity: Identity, compressed: Compressed, *, kind: Kind,
                   receiver: bytes, round: int, epoch: int, seq: int,
                   manifest: bytes, flags: int = 0) -> bytes:
    """The signed wire message carrying ``compressed`` to ``receiver``."""
    if compressed.codec is Codec.DENSE_F32:
        rice, unary, low = 0, b"", b""
        values = compressed.values.astype("<f4").tobytes()
        scales = b""
        nnz, block = compressed.dim, 0
    else:
        if compressed.quantized is None or compressed.scales is None:
            raise ValueError("a top-k delta needs its quantized values and scales")
        rice, unary, low = encode_indices(compressed.indices)
        if compressed.codec is Codec.TOPK_INT4:
            values = pack_int4(compressed.quantized)
        else:
            values = compressed.quantized.tobytes()
        scales = compressed.scales.astype("<f4").tobytes()
        nnz, block = int(compressed.indices.size), compressed.block
    head = HEADER.pack(MAGIC, VERSION, kind, compressed.codec, flags,
                       identity.public_key, receiver, round, epoch, seq, manifest,
                       compressed.dim, nnz, block, rice, 0, len(unary), len(low))
    body = b"".join((head, unary, low, values, scales))
    return body + identity.sign(body)


# --- decoding -------------------------------------------------------------------


def parse_header(data: bytes, max_bytes: int) -> Header:
    """The fixed header of ``data``, after the size cap and every length check."""
    if len(data) > max_bytes:
        raise MessageRefused("oversized",
                             f"message of {len(data)} bytes exceeds max {max_bytes}")
    if len(data) < OVERHEAD_BYTES:
        raise DecodeError(f"message of {len(data)} bytes is shorter than the "
                          f"{OVERHEAD_BYTES}-byte header and signature", len(data))
    (magic, version, kind, codec, flags, sender, receiver, round_, epoch, seq,
     manifest, dim, nnz, block, rice, reserved, unary_len, low_len
     ) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"magic {magic!r} is not {MAGIC!r}", 0)
    if version != VERSION:
        raise MessageRefused("version",
                             f"wire version {version} is not supported "
                             f"(want {VERSION})")
    if kind not in Kind.__members__.values():
        raise DecodeError(f"message kind {kind} is unknown", 5)
    if codec not in Codec.__members__.values():
        raise DecodeError(f"codec id {codec} is unknown", 6)
    if flags & ~KNOWN_FLAGS:
        raise DecodeError(f"flags 0x{flags:02x} set unknown bits", 7)
    if reserved:
        raise DecodeError(f"reserved byte is {reserved}, must be 0", 115)
    header = Header(Kind(kind), Codec(codec), flags, sender, receiver, round_, epoch,
                    seq, manifest, dim, nnz, block, rice, unary_len, low_len)
    _check_counts(header)
    if header.total_len != len(data):
        raise DecodeError(f"header declares {header.total_len} bytes but the message "
                          f"has {len(data)}", min(len(data), header.total_len))
    return header


def _check_counts(h: Header) -> None:
    if h.codec is Codec.DENSE_F32:
        if (h.nnz, h.block, h.rice, h.unary_len, h.low_len) != (h.dim, 0, 0, 0, 0):
            raise DecodeError("a dense message must have nnz = dim and no index "
                              "streams", 104)
        return
    if h.nnz > h.dim:
        raise DecodeError(f"nnz {h.nnz} exceeds dimension {h.dim}", 108)
    if h.block < 1:
        raise DecodeError("block size 0 is not allowed", 112)
    if h.rice > MAX_RICE:
        raise DecodeError(f"rice parameter {h.rice} exceeds max {MAX_RICE}", 114)
    if h.low_len != -(-h.nnz * h.rice // 8):
        raise DecodeError(f"low stream of {h.low_len} bytes, expected "
                          f"{-(-h.nnz * h.rice // 8)} for {h.nnz} x {h.rice} bits", 120)
    if h.unary_len < -(-h.nnz // 8):
        raise DecodeError(f"unary stream of {h.unary_len} bytes cannot hold "
                          f"{h.nnz} indices", 116)


def verify_signature(data: bytes, header: Header) -> None:
    """Refuse ``data`` unless its sender's signature covers every byte before it."""
    split = header.signature_off
    if not verify(header.sender, data[:split], data[split:]):
        raise MessageRefused("bad-signature",
                             f"signature does not verify for sender "
                             f"{header.sender.hex()[:8]}")


def decode_indices(data: bytes, h: Header) -> npt.NDArray[np.int64]:
    """The sorted indices coded in ``data``; refuses any non-canonical stream."""
    if h.nnz == 0:
        if h.unary_len:
            raise DecodeError("an empty message must have an empty unary stream",
                              h.unary_off)
        return np.zeros(0, dtype=np.int64)
    unary = np.frombuffer(data, np.uint8, h.unary_len, h.unary_off)
    ones = np.flatnonzero(np.unpackbits(unary))
    if ones.size < h.nnz:
        raise DecodeError(f"unary stream ends after {ones.size} of {h.nnz} indices",
                          h.unary_off + h.unary_len)
    if ones.size > h.nnz or int(ones[-1]) // 8 != h.unary_len - 1:
        raise DecodeError("unary stream has bits or bytes after its last index",
                          h.unary_off + int(ones[h.nnz - 1]) // 8)
    high = np.diff(ones, prepend=-1).astype(np.uint64) - np.uint64(1)
    gaps = high << np.uint64(h.rice)
    if h.rice:
        low = np.frombuffer(data, np.uint8, h.low_len, h.low_off)
        bits = np.unpackbits(low)
        if bits[h.nnz * h.rice:].any():
            raise DecodeError("low stream padding is not zero",
                              h.low_off + h.low_len - 1)
        weights = np.uint64(1) << np.arange(h.rice - 1, -1, -1, dtype=np.uint64)
        table = bits[: h.nnz * h.rice].reshape(h.nnz, h.rice).astype(np.uint64)
        gaps |= table @ weights
    # No single gap may pass the end; then the running sum cannot overflow 64 bits.
    if int(gaps.max()) >= h.dim:
        raise MessageRefused("index-range",
                             f"an index gap of {int(gaps.max())} reaches past "
                             f"dimension {h.dim}")
    indices = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
    if int(indices[-1]) >= h.dim:
        raise MessageRefused("index-range",
                             f"index {int(indices[-1])} is out of range for "
                             f"dimension {h.dim}")
    return indices.astype(np.int64)


def decode_quantized(data: bytes, h: Header) -> npt.NDArray[np.int8]:
    """The quantized values, with the never-produced -128 / -8 refused."""
    raw = np.frombuffer(data, np.int8, h.values_len, h.values_off)
    if h.codec is Codec.TOPK_INT4:
        u = raw.view(np.uint8)
        nibbles = np.empty(2 * u.size, dtype=np.int8)
        nibbles[0::2] = (u & 0x0F).astype(np.int8)
        nibbles[1::2] = (u >> 4).astype(np.int8)
        nibbles[nibbles > 7] -= 16
        if h.nnz % 2 and nibbles[-1] != 0:
            raise DecodeError("int4 padding nibble is not zero", h.scales_off - 1)
        raw = nibbles[: h.nnz]
    bad = np.flatnonzero(raw < -QMAX[h.codec])
    if bad.size:
        # The offset is of the byte holding the value; int4 packs two per byte.
        at = int(bad[0]) // 2 if h.codec is Codec.TOPK_INT4 else int(bad[0])
        raise DecodeError(f"quantized value {int(raw[bad[0]])} is below "
                          f"-{QMAX[h.codec]}", h.values_off + at)
    return raw


def decode_scales(data: bytes, h: Header) -> F32:
    """Per-block scales: finite, non-negative, and small enough not to overflow."""
    scales = np.frombuffer(data, "<f4", h.nblocks, h.scales_off).astype(np.float32)
    limit = np.float32(np.finfo(np.float32).max / QMAX[h.codec])
    bad = np.flatnonzero(~(np.isfinite(scales) & (scales >= 0) & (scales <= limit)))
    if bad.size:
        raise MessageRefused("non-finite",
                             f"block {int(bad[0])} scale {float(scales[bad[0]])!r} is "
                             f"not in [0, {float(limit):.3e}]")
    return scales


def decode_delta(data: bytes, h: Header) -> tuple[npt.NDArray[np.int64], F32]:
    """Sorted indices and float32 values of a parsed, verified message."""
    if h.codec is Codec.DENSE_F32:
        dense = np.frombuffer(data, "<f4", h.dim, h.values_off).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(dense))
        if bad.size:
            raise MessageRefused("non-finite",
                                 f"value {float(dense[bad[0]])!r} at index "
                                 f"{int(bad[0])}")
        return np.arange(h.dim, dtype=np.int64), dense
    indices = decode_indices(data, h)
    quantized = decode_quantized(data, h)
    scales = decode_scales(data, h)
    per_entry = np.repeat(scales, h.block)[: h.nnz]
    values: F32 = quantized.astype(np.float32) * per_entry
    return indices, values

