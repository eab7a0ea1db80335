"""Index coding against the information limit, for docs/wire-format.md.

For a few (d, k) it draws k distinct positions uniformly (what top-k of a noisy
delta looks like), codes them with ``codec.encode_indices`` and prints the measured
bits per index (both streams, whole bytes) next to log2(C(d, k)) / k, the fewest
bits any code can average over all k-subsets; and the whole int8 message's bytes
per nonzero at block size 64.

    PYTHONPATH=. python benchmarks/index_bits.py
"""

from __future__ import annotations

import math

import numpy as np

from gossipfl import codec

CASES = [(10_000, 100), (100_000, 10_000), (1_000_000, 1_000), (1_000_000, 10_000),
         (10_000_000, 10_000), (10_000_000, 100_000), (1_000_000, 250_000)]
BLOCK = 64


def limit_bits(d: int, k: int) -> float:
    """log2(C(d, k)) / k."""
    log_choose = math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)
    return log_choose / math.log(2) / k


def main() -> None:
    rng = np.random.default_rng(0)
    print("| d | k | density | Rice b | measured bits/index | log2(C(d,k))/k "
          "| over limit | int8 message bytes/nonzero |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, k in CASES:
        indices = np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64)
        rice, unary, low = codec.encode_indices(indices)
        measured = 8 * (len(unary) + len(low)) / k
        limit = limit_bits(d, k)
        message = (codec.OVERHEAD_BYTES + len(unary) + len(low) + k
                   + 4 * -(-k // BLOCK))
        print(f"| {d:,} | {k:,} | {k / d:.2%} | {rice} | {measured:.3f} "
              f"| {limit:.3f} | {measured / limit - 1:+.2%} | {message / k:.3f} |")


if __name__ == "__main__":
    main()
