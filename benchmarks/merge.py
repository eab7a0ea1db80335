"""Merge throughput: the C kernel against the numpy reference, side by side.

For each dimension, density and batch size it times decode + merge on both paths in
the same run (best and median of ``--repeat``), and sets them against a memory
bandwidth floor: the bytes the merge must touch (the messages, and each distinct
64-byte line of the target read and written once) over this machine's copy
bandwidth, measured here with a large numpy copy. It also times the send side per
message (top-k, quantization, index coding) and one message end to end on the
receive side (header, Ed25519 verification with pynacl, decode, merge).

    PYTHONPATH=. python benchmarks/merge.py [--quick] [--json]

Timings are wall clock on whatever else the machine is doing; read the ratios, which
are measured within one run, rather than the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from gossipfl import codec, compress
from gossipfl.codec import Header, Kind
from gossipfl.compress import F32, CompressionSpec
from gossipfl.identity import Identity
from gossipfl.merge import Batch, MergeFn, c_merge, merge_numpy

LINE_BYTES = 64
FLOATS_PER_LINE = LINE_BYTES // 4
COPY_BYTES = 256 << 20
COLD_BYTES = 256 << 20  # touched per rotation: well over any last-level cache
MAX_TARGETS_BYTES = 1 << 30
IDENTITY = Identity.from_seed(bytes(32))


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best and median wall time of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def copy_bandwidth(repeat: int) -> float:
    """Bytes per second moved (read + written) by a large numpy copy."""
    src = np.ones(COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best, _ = timed(lambda: np.copyto(dst, src), repeat)
    return 2 * COPY_BYTES / best


def make_batch(rng: np.random.Generator, dim: int, density: float, count: int
               ) -> list[tuple[bytes, Header, compress.Compressed]]:
    spec = CompressionSpec.from_name("topk-int8", density, 64)
    out = []
    for _ in range(count):
        delta = rng.standard_normal(dim, dtype=np.float32)
        compressed = compress.compress(delta, spec, rng)
        data = codec.encode_message(IDENTITY, compressed, kind=Kind.REQUEST,
                                    receiver=bytes(32), round=1, epoch=0, seq=0,
                                    manifest=bytes(16))
        header = codec.parse_header(data, codec.max_message_bytes(dim))
        out.append((data, header, compressed))
    return out


def touched_bytes(batch: list[tuple[bytes, Header, compress.Compressed]]) -> int:
    """Bytes a merge must move: the messages, and every target line read + written."""
    touched = 0
    for data, _, compressed in batch:
        lines = np.unique(compressed.indices // FLOATS_PER_LINE).size
        touched += len(data) + 2 * LINE_BYTES * lines
    return touched


def cold_calls(pairs: list[tuple[bytes, Header]], weights: list[float],
               touched: int, rng: np.random.Generator) -> Callable[[MergeFn], None]:
    """A caller that rotates over enough targets that the lines one call touches
    have left the cache by the time they come round again, as a node's model has
    between two messages (training runs in between)."""
    dim = pairs[0][1].dim
    count = min(MAX_TARGETS_BYTES // (4 * dim), max(2, -(-COLD_BYTES // touched)))
    targets = [rng.standard_normal(dim, dtype=np.float32) for _ in range(count)]
    turn = iter(range(1 << 62))

    def call(fn: MergeFn) -> None:
        fn(targets[next(turn) % count], pairs, weights)

    return call


def bench_merge(paths: dict[str, MergeFn], dim: int, density: float, count: int,
                repeat: int, bandwidth: float, rng: np.random.Generator
                ) -> dict[str, Any]:
    batch = make_batch(rng, dim, density, count)
    pairs = [(data, header) for data, header, _ in batch]
    weights = [1.0 / count] * count
    nnz = sum(header.nnz for _, header in pairs)
    call = cold_calls(pairs, weights, touched_bytes(batch), rng)

    row: dict[str, Any] = {"dim": dim, "density": density, "batch": count,
                           "nnz": nnz}
    warm = rng.standard_normal(dim, dtype=np.float32)
    for name, fn in paths.items():
        best, median = timed(partial(call, fn), repeat)
        row[f"{name}_mnnz_s"] = nnz / best / 1e6
        row[f"{name}_median_mnnz_s"] = nnz / median / 1e6
        best, _ = timed(partial(fn, warm, pairs, weights), repeat)
        row[f"{name}_warm_mnnz_s"] = nnz / best / 1e6
    if "c" in paths:
        row["ratio"] = row["c_mnnz_s"] / row["numpy_mnnz_s"]
        row["warm_ratio"] = row["c_warm_mnnz_s"] / row["numpy_warm_mnnz_s"]
    row["floor_mnnz_s"] = nnz / (touched_bytes(batch) / bandwidth) / 1e6
    row["wire_bytes_per_nnz"] = sum(len(d) for d, _ in pairs) / nnz
    row["index_bits"] = sum(8 * (h.unary_len + h.low_len) for _, h in pairs) / nnz
    return row


def bench_encode(dim: int, density: float, repeat: int, rng: np.random.Generator
                 ) -> dict[str, Any]:
    spec = CompressionSpec.from_name("topk-int8", density, 64)
    delta = rng.standard_normal(dim, dtype=np.float32)
    k = spec.k_for(dim)
    indices = compress.top_k(delta, k)
    picked = delta[indices]
    scales = compress.block_scales(picked, 64, 127)
    compressed = compress.compress(delta, spec, rng)
    steps = {
        "top_k_ms": lambda: compress.top_k(delta, k),
        "quantize_ms": lambda: compress.quantize(
            picked, compress.block_scales(picked, 64, 127), 64, 127, rng),
        "index_coding_ms": lambda: codec.encode_indices(indices),
        "encode_and_sign_ms": lambda: codec.encode_message(
            IDENTITY, compressed, kind=Kind.REQUEST, receiver=bytes(32), round=1,
            epoch=0, seq=0, manifest=bytes(16)),
    }
    del scales
    row: dict[str, Any] = {"dim": dim, "density": density, "nnz": k}
    for name, fn in steps.items():
        row[name] = timed(fn, repeat)[0] * 1e3
    return row


def bench_end_to_end(paths: dict[str, MergeFn], dim: int, density: float,
                     repeat: int, rng: np.random.Generator) -> dict[str, Any]:
    batch = make_batch(rng, dim, density, 1)
    ((data, header, _),) = batch
    cap = codec.max_message_bytes(dim)
    row: dict[str, Any] = {"dim": dim, "density": density, "nnz": header.nnz}

    def receiving(merge: MergeFn) -> MergeFn:
        def receive(target: F32, pairs: Batch, weights: Sequence[float]) -> None:
            parsed = codec.parse_header(data, cap)
            codec.verify_signature(data, parsed)
            merge(target, [(data, parsed)], weights)
        return receive

    call = cold_calls([(data, header)], [0.5], touched_bytes(batch), rng)

    row["verify_ms"] = timed(lambda: codec.verify_signature(data, header),
                             repeat)[0] * 1e3
    for name, fn in paths.items():
        row[f"{name}_ms"] = timed(partial(call, receiving(fn)), repeat)[0] * 1e3
    if "c" in paths:
        row["ratio"] = row["numpy_ms"] / row["c_ms"]
    return row


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="d = 1e6 only, fewer repeats")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)

    dims = [10**6] if args.quick else [10**6, 10**7]
    repeat = 3 if args.quick else args.repeat
    paths: dict[str, MergeFn] = {"numpy": merge_numpy}
    merge_c = c_merge()
    if merge_c is not None:
        paths["c"] = merge_c
    rng = np.random.default_rng(0)

    bandwidth = copy_bandwidth(repeat)
    merges = [bench_merge(paths, dim, density, count, repeat, bandwidth, rng)
              for dim in dims for density in (0.01, 0.001) for count in (1, 8)]
    encodes = [bench_encode(dim, density, repeat, rng)
               for dim in dims for density in (0.01, 0.001)]
    ends = [bench_end_to_end(paths, dim, 0.01, repeat, rng) for dim in dims]
    result = {"copy_bandwidth_gb_s": bandwidth / 1e9, "paths": list(paths),
              "merge": merges, "encode": encodes, "end_to_end": ends}

    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write); "
          f"paths: {', '.join(paths)}\n")
    print("decode + merge, M nonzeros/s, best of repeats (medians in --json);\n"
          "cold: the target's lines are out of cache, warm: the same target "
          "again")
    print(table(merges, ["dim", "density", "batch", "nnz", "numpy_mnnz_s",
                         "c_mnnz_s", "ratio", "numpy_warm_mnnz_s",
                         "c_warm_mnnz_s", "warm_ratio", "floor_mnnz_s"]))
    print("\nwire: bytes per nonzero (whole message) and index bits per nonzero")
    print(table(merges[::2], ["dim", "density", "nnz", "wire_bytes_per_nnz",
                              "index_bits"]))
    print("\nsend side per message, ms")
    print(table(encodes, ["dim", "density", "nnz", "top_k_ms", "quantize_ms",
                          "index_coding_ms", "encode_and_sign_ms"]))
    print("\nreceive one message end to end (parse, verify, decode, merge; cold), "
          "ms")
    print(table(ends, ["dim", "density", "nnz", "verify_ms", "numpy_ms", "c_ms",
                       "ratio"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
