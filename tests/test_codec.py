"""The wire codec: round trips, size accounting, and refusal of bad bytes."""

import math
import struct

import numpy as np
import pytest

from gossipfl.codec import (
    HEADER_BYTES,
    OVERHEAD_BYTES,
    Kind,
    decode_delta,
    dense_message_bytes,
    encode_message,
    max_message_bytes,
    parse_header,
    verify_signature,
)
from gossipfl.compress import Codec, CompressionSpec, compress
from gossipfl.errors import DecodeError, MessageRefused
from gossipfl.identity import Identity

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
MANIFEST = b"m" * 16


def message(delta: np.ndarray, codec: Codec = Codec.TOPK_INT8,
            fraction: float = 0.05, **kw: int) -> tuple[bytes, object]:
    out = compress(delta, CompressionSpec(codec, fraction), np.random.default_rng(0))
    data = encode_message(ALICE, out, kind=Kind.REQUEST, receiver=BOB.public_key,
                          round=kw.get("round", 7), epoch=kw.get("epoch", 1),
                          seq=kw.get("seq", 2), manifest=MANIFEST)
    return data, out


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("dim,fraction", [(1, 1.0), (10, 0.5), (4810, 0.05),
                                          (100_000, 0.001), (65, 1.0)])
def test_round_trip_gives_back_exactly_what_was_compressed(
        codec: Codec, dim: int, fraction: float) -> None:
    delta = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    data, out = message(delta, codec, fraction)
    header = parse_header(data, max_message_bytes(dim))
    verify_signature(data, header)
    indices, values = decode_delta(data, header)
    assert np.array_equal(indices, out.indices)
    assert np.array_equal(values, out.values)
    assert (header.sender, header.receiver) == (ALICE.public_key, BOB.public_key)
    assert (header.round, header.epoch, header.seq) == (7, 1, 2)
    assert header.codec is codec and header.dim == dim


def test_header_is_124_bytes_and_dense_size_is_counted_exactly() -> None:
    assert HEADER_BYTES == 124
    data, _ = message(np.ones(1000, dtype=np.float32), Codec.DENSE_F32)
    assert len(data) == OVERHEAD_BYTES + 4000 == dense_message_bytes(1000)
    assert max_message_bytes(1000) > len(data)


def test_sparse_message_is_close_to_two_bytes_per_nonzero() -> None:
    delta = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    data, out = message(delta, Codec.TOPK_INT8, 0.01)
    per_nonzero = (len(data) - OVERHEAD_BYTES) / out.indices.size
    assert per_nonzero <= 2.2
    k, d = out.indices.size, delta.size
    limit = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) \
        / math.log(2) / k
    header = parse_header(data, len(data))
    index_bits = 8 * (header.unary_len + header.low_len) / k
    assert index_bits <= 1.05 * limit


def test_empty_delta_encodes_as_zero_entries() -> None:
    data, _out = message(np.zeros(50, dtype=np.float32))
    header = parse_header(data, len(data))
    assert header.nnz == 0
    indices, values = decode_delta(data, header)
    assert indices.size == 0 and values.size == 0


def test_oversized_is_refused_before_parsing() -> None:
    data, _ = message(np.ones(100, dtype=np.float32))
    with pytest.raises(MessageRefused) as info:
        parse_header(b"\xff" * (len(data) + 1), len(data))
    assert info.value.reason == "oversized"
    assert str(len(data) + 1) in str(info.value)


@pytest.mark.parametrize("cut", [1, 10, 64, 65])
def test_truncated_message_is_refused_with_offset(cut: int) -> None:
    data, _ = message(np.random.default_rng(0).standard_normal(500).astype(np.float32))
    with pytest.raises(DecodeError) as info:
        parse_header(data[:-cut], len(data))
    assert info.value.offset <= len(data) - cut
    assert "offset" in str(info.value)


def test_extra_trailing_bytes_are_refused() -> None:
    data, _ = message(np.ones(100, dtype=np.float32))
    with pytest.raises(DecodeError, match="declares"):
        parse_header(data + b"\0", len(data) + 1)


def test_any_flipped_bit_breaks_the_signature() -> None:
    data, _ = message(np.random.default_rng(0).standard_normal(300).astype(np.float32))
    for position in (0 + 8, HEADER_BYTES - 1, HEADER_BYTES + 3, len(data) - 70):
        bad = bytearray(data)
        bad[position] ^= 0x01
        with pytest.raises(MessageRefused) as info:
            header = parse_header(bytes(bad), len(data))
            verify_signature(bytes(bad), header)
        assert info.value.reason in ("bad-signature", "malformed")


def test_header_field_errors_name_the_value() -> None:
    data, _ = message(np.ones(100, dtype=np.float32))
    bad = bytearray(data)
    bad[4] = 9  # version
    with pytest.raises(MessageRefused, match="wire version 9"):
        parse_header(bytes(bad), len(data))
    bad = bytearray(data)
    bad[0:4] = b"XXXX"
    with pytest.raises(DecodeError, match="magic"):
        parse_header(bytes(bad), len(data))
    bad = bytearray(data)
    struct.pack_into("<I", bad, 108, 101)  # nnz > dim
    with pytest.raises(DecodeError, match="nnz 101 exceeds dimension 100"):
        parse_header(bytes(bad), len(data))


def resign(data: bytearray) -> bytes:
    body = bytes(data[:-64])
    return body + ALICE.sign(body)


def test_nan_and_inf_values_are_refused_as_non_finite() -> None:
    for bad_value in (np.nan, np.inf, -np.inf):
        data, _ = message(np.ones(10, dtype=np.float32), Codec.DENSE_F32)
        raw = bytearray(data)
        struct.pack_into("<f", raw, HEADER_BYTES + 12, bad_value)
        signed = resign(raw)
        header = parse_header(signed, len(signed))
        verify_signature(signed, header)
        with pytest.raises(MessageRefused) as info:
            decode_delta(signed, header)
        assert info.value.reason == "non-finite"


def test_nan_scale_is_refused() -> None:
    data, _ = message(np.ones(100, dtype=np.float32), Codec.TOPK_INT8, 0.1)
    header = parse_header(data, len(data))
    raw = bytearray(data)
    struct.pack_into("<f", raw, header.scales_off, np.nan)
    signed = resign(raw)
    with pytest.raises(MessageRefused) as info:
        decode_delta(signed, parse_header(signed, len(signed)))
    assert info.value.reason == "non-finite"


def test_quantized_minus_128_is_refused() -> None:
    data, _ = message(np.ones(100, dtype=np.float32), Codec.TOPK_INT8, 0.1)
    header = parse_header(data, len(data))
    raw = bytearray(data)
    raw[header.values_off] = 0x80
    signed = resign(raw)
    with pytest.raises(DecodeError, match="-128"):
        decode_delta(signed, parse_header(signed, len(signed)))
