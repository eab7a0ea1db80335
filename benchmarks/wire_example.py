"""The worked example of docs/wire-format.md: a tiny message, dumped by section.

    PYTHONPATH=. python benchmarks/wire_example.py
"""

from __future__ import annotations

import numpy as np

from gossipfl import codec
from gossipfl.codec import Kind
from gossipfl.compress import Codec, Compressed, dequantize
from gossipfl.identity import Identity

SEED = bytes([0x42]) * 32
INDICES = [1, 4, 5, 13]
QUANTIZED = [100, -3, 127, -127]
SCALES = [0.01, 0.5]
BLOCK = 2
DIM = 16


def example() -> bytes:
    quantized = np.array(QUANTIZED, dtype=np.int8)
    scales = np.array(SCALES, dtype=np.float32)
    compressed = Compressed(Codec.TOPK_INT8, DIM, np.array(INDICES, dtype=np.int64),
                            dequantize(quantized, scales, BLOCK), quantized, scales,
                            BLOCK)
    return codec.encode_message(Identity.from_seed(SEED), compressed,
                                kind=Kind.REQUEST, receiver=bytes([0x11]) * 32,
                                round=3, epoch=1, seq=5, manifest=bytes([0xAA]) * 16)


def main() -> None:
    data = example()
    header = codec.parse_header(data, codec.max_message_bytes(DIM))
    sections = [("header", 0, codec.HEADER_BYTES),
                ("unary stream", header.unary_off, header.low_off),
                ("low stream", header.low_off, header.values_off),
                ("int8 values", header.values_off, header.scales_off),
                ("float32 scales", header.scales_off, header.signature_off),
                ("Ed25519 signature", header.signature_off, header.total_len)]
    for name, start, stop in sections:
        print(f"# {name}: bytes {start}..{stop - 1}")
        for row in range(start, stop, 16):
            chunk = data[row:min(row + 16, stop)]
            print(f"{row:04x}  {chunk.hex(' ')}")
    print(f"# {len(data)} bytes")


if __name__ == "__main__":
    main()
