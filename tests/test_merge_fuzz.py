"""Fuzzing the decoders: mutated and truncated messages, both merge paths.

Valid messages are damaged (byte flips anywhere, mostly in the payload; the unary
stream grown or shrunk with its length field kept consistent; the tail cut off) and
run through ``parse_header`` and then both merge paths. Neither may raise anything
but a refusal, write outside the target (guard entries either side), write at all
when refusing, or change the message bytes; and both must reach the same verdict,
with the same refusal or the same bits. The example count is bounded for CI.
"""

from __future__ import annotations

import struct
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import random_message, run

from gossipfl import codec
from gossipfl.codec import Header
from gossipfl.compress import Codec
from gossipfl.errors import MessageRefused
from gossipfl.merge import c_merge, merge_numpy

UNARY_LEN_AT = 116  # offset of the unary_len field in the header

BASES = [  # (dim, fraction, codec, block)
    (40, 0.3, "topk-int8", 4),
    (300, 0.05, "topk-int8", 64),
    (257, 0.2, "topk-int4", 5),
    (64, 1.0, "topk-int4", 64),
    (5000, 0.002, "topk-int8", 3),
    (12, 1.0, "none", 0),
]


@cache
def base(i: int) -> tuple[bytes, Header]:
    dim, fraction, name, block = BASES[i]
    _, data, header = random_message(np.random.default_rng(i), dim, fraction, name,
                                     max(block, 1))
    return data, header


@st.composite
def damaged(draw: st.DrawFn) -> tuple[int, bytes]:
    i = draw(st.integers(0, len(BASES) - 1))
    data, header = base(i)
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["payload", "payload", "payload", "anywhere",
                                   "unary", "truncate"]))
        if op == "truncate":
            del out[len(out) - draw(st.integers(1, min(80, len(out)))):]
            break
        if op == "unary" and header.codec is not Codec.DENSE_F32:
            (unary_len,) = struct.unpack_from("<I", out, UNARY_LEN_AT)
            change = draw(st.integers(-2, 3))
            end = codec.HEADER_BYTES + unary_len
            if change < 0 and unary_len + change >= 0:
                del out[end + change:end]
            elif change > 0:
                out[end:end] = draw(st.binary(min_size=change, max_size=change))
            else:
                continue
            struct.pack_into("<I", out, UNARY_LEN_AT, unary_len + change)
            continue
        low = codec.HEADER_BYTES if op == "payload" else 0
        high = max(low, header.signature_off - 1)
        at = draw(st.integers(low, min(high, len(out) - 1)))
        out[at] ^= draw(st.integers(1, 255))
    return i, bytes(out)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged())
def test_damaged_messages_never_crash_and_both_paths_agree(
        case: tuple[int, bytes]) -> None:
    merge_c = c_merge()
    if merge_c is None:
        pytest.skip("C merge kernel not built")
    i, data = case
    good, good_header = base(i)
    try:
        header = codec.parse_header(data, codec.max_message_bytes(good_header.dim))
    except MessageRefused:
        return  # refused before either merge path sees it
    if header.dim > 2 * good_header.dim:
        return  # the node refuses a dimension that is not its model's first
    # behind a good message, to see that a refusal undoes nothing already written
    batch = [(data, header)]
    if header.dim == good_header.dim:
        batch.insert(0, (good, good_header))
    weights = [0.75] * len(batch)
    target = np.linspace(-3, 3, header.dim, dtype=np.float32)
    numpy_outcome = run(merge_numpy, target, batch, weights)
    assert run(merge_c, target, batch, weights) == numpy_outcome
