"""Regressions in the lead's codec found while writing the merge kernel."""

from __future__ import annotations

import numpy as np
import pytest
from wire import encode, sparse

from gossipfl import codec
from gossipfl.compress import Codec, CompressionSpec, compress
from gossipfl.errors import DecodeError


@pytest.mark.parametrize("dim", [1, 2, 3, 8, 9, 100, 4099])
@pytest.mark.parametrize("name", ["topk-int8", "topk-int4", "none"])
def test_honest_messages_fit_under_the_size_cap(dim: int, name: str) -> None:
    """A full-density block-1 message is larger than a dense one; the cap used to
    be the dense size and refused it as oversized."""
    rng = np.random.default_rng(dim)
    spec = CompressionSpec.from_name(name, 1.0, 1)
    compressed = compress(rng.standard_normal(dim).astype(np.float32) + 5, spec, rng)
    data, header = encode(compressed)  # parses under max_message_bytes(dim)
    assert len(data) <= codec.max_message_bytes(dim)
    assert header.nnz == dim


def test_int4_value_offsets_name_the_byte_holding_the_value() -> None:
    """decode_quantized added the nibble index to the offset, which for late values
    pointed past the values section."""
    data, header = sparse(list(range(8)), 8, [1] * 8, [1.0], 8, Codec.TOPK_INT4)
    at = header.values_off + 3
    data = data[:at] + bytes([0x81]) + data[at + 1:]  # the 8th value is -8
    with pytest.raises(DecodeError) as refused:
        codec.decode_delta(data, header)
    assert refused.value.offset == at < header.scales_off
