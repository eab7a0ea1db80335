"""Both merge paths compute the same bits and refuse the same messages the same way.

Every test that takes ``merge_path`` runs once on the numpy reference and once on the
C kernel. Expected results come from the sender's side (the ``Compressed`` values the
encoder started from) or are written out by hand, so a test fails if either path is
wrong, not only when the two disagree.
"""

from __future__ import annotations

import importlib
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import (
    Outcome,
    assemble,
    c_required,
    encode,
    random_message,
    run,
    sparse,
)

from gossipfl import codec, merge
from gossipfl.codec import Header
from gossipfl.compress import F32, Codec, Compressed
from gossipfl.errors import ConfigError
from gossipfl.merge import MergeFn, merge_numpy

Path = tuple[str, MergeFn]

LIMIT_INT8 = float(np.float32(np.finfo(np.float32).max / 127))


def expected(target: F32, sent: list[Compressed], weights: list[float]) -> bytes:
    """``target + w * value`` per message in order, from what the senders encoded."""
    out = target.copy()
    for compressed, weight in zip(sent, weights, strict=True):
        term = np.float32(weight) * compressed.values
        out[compressed.indices] = out[compressed.indices] + term
    return out.tobytes()


def test_c_kernel_is_built() -> None:
    """In CI (CI=true) or with GOSSIPFL_REQUIRE_C=1 a missing C kernel fails."""
    if not c_required():
        pytest.skip("C kernel not required here; set GOSSIPFL_REQUIRE_C=1 to demand it")
    importlib.import_module("gossipfl._merge")
    assert merge.c_merge() is not None


def test_c_kernel_constants_match_the_codec() -> None:
    kernel = pytest.importorskip("gossipfl._merge")
    assert kernel.HEADER_BYTES == codec.HEADER_BYTES
    assert kernel.SIGNATURE_BYTES == codec.OVERHEAD_BYTES - codec.HEADER_BYTES
    assert kernel.MAX_RICE == codec.MAX_RICE


# --- selection --------------------------------------------------------------------


def test_select_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(merge.ENV_VAR, "numpy")
    assert merge.select() == ("numpy", merge_numpy)
    monkeypatch.setenv(merge.ENV_VAR, "auto")
    name, _ = merge.select()
    assert name == ("c" if merge.c_merge() else "numpy")
    monkeypatch.setenv(merge.ENV_VAR, "fortran")
    with pytest.raises(ConfigError, match="fortran"):
        merge.select()


def test_select_c_is_an_error_when_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(merge.ENV_VAR, "c")
    if merge.c_merge() is None:
        with pytest.raises(ConfigError, match="not built"):
            merge.select()
    else:
        assert merge.select()[0] == "c"


# --- results ----------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "fraction", "codec_name", "block", "count"), [
    (1, 1.0, "topk-int8", 1, 1),
    (2, 0.5, "topk-int4", 1, 2),
    (17, 0.3, "topk-int8", 4, 3),
    (100, 0.01, "topk-int8", 64, 1),
    (1000, 0.5, "topk-int4", 7, 4),
    (4096, 1.0, "topk-int8", 64, 2),
    (10_000, 0.001, "topk-int8", 64, 8),
    (10_000, 0.1, "topk-int4", 128, 3),
    (100_003, 0.01, "topk-int8", 64, 2),
    (300_000, 0.0001, "topk-int4", 65535, 2),
    (50, 1.0, "none", 0, 3),
    (70_001, 1.0, "none", 0, 2),
])
def test_random_batches_match_the_senders_values(
        merge_path: Path, dim: int, fraction: float, codec_name: str, block: int,
        count: int) -> None:
    _, merge_fn = merge_path
    rng = np.random.default_rng(dim + count)
    messages = [random_message(rng, dim, fraction, codec_name, max(block, 1))
                for _ in range(count)]
    weights = [float(w) for w in rng.uniform(-1.5, 1.5, count)]
    target = rng.standard_normal(dim).astype(np.float32)
    outcome = run(merge_fn, target, [(d, h) for _, d, h in messages], weights)
    assert outcome.bits == expected(target, [c for c, _, _ in messages], weights)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 3000),
       fraction=st.floats(0.0005, 1.0), block=st.integers(1, 300),
       codec_name=st.sampled_from(["topk-int8", "topk-int4", "none"]),
       count=st.integers(1, 4))
def test_c_equals_numpy_bit_for_bit(seed: int, dim: int, fraction: float, block: int,
                                    codec_name: str, count: int) -> None:
    merge_c = merge.c_merge()
    if merge_c is None:
        pytest.skip("C merge kernel not built")
    rng = np.random.default_rng(seed)
    batch = [random_message(rng, dim, fraction, codec_name, block)[1:]
             for _ in range(count)]
    weights = [float(w) for w in rng.uniform(-2, 2, count)]
    target = (rng.standard_normal(dim) * 1e3).astype(np.float32)
    assert run(merge_c, target, batch, weights) == run(merge_numpy, target, batch,
                                                       weights)


def test_duplicate_indices_across_a_batch_accumulate_in_order(merge_path: Path
                                                              ) -> None:
    _, merge_fn = merge_path
    first = sparse([0, 5, 9], 10, [127, -127, 1], [0.5], 64)
    second = sparse([5, 9], 10, [3, 127], [0.25], 64)
    target = np.full(10, 1e8, dtype=np.float32)
    outcome = run(merge_fn, target, [first, first, second], [1.0, 0.5, 3.0])

    want = target.copy()
    for idx, q, s, w in (([0, 5, 9], [127, -127, 1], 0.5, 1.0),
                         ([0, 5, 9], [127, -127, 1], 0.5, 0.5),
                         ([5, 9], [3, 127], 0.25, 3.0)):
        for i, qi in zip(idx, q, strict=True):
            want[i] = want[i] + np.float32(w) * (np.float32(qi) * np.float32(s))
    assert outcome.bits == want.tobytes()
    # 1e8 + 63.5 rounds in float32; the order of additions shows in the result.
    assert outcome.bits != (target + np.float32(95.25)).tobytes()


@pytest.mark.parametrize("codec_id", [Codec.TOPK_INT8, Codec.TOPK_INT4])
@pytest.mark.parametrize("dim", [1, 2, 9, 1 << 20])
def test_first_and_last_index(merge_path: Path, codec_id: Codec, dim: int) -> None:
    _, merge_fn = merge_path
    indices = sorted({0, dim - 1})
    q = [7, -7][: len(indices)]
    target = np.zeros(dim, dtype=np.float32)
    outcome = run(merge_fn, target, [sparse(indices, dim, q, [2.0], 2, codec_id)],
                  [1.0])
    assert outcome.bits is not None
    got = np.frombuffer(outcome.bits, dtype=np.float32)
    assert got[indices].tolist() == [14.0, -14.0][: len(indices)]
    assert np.count_nonzero(got) == len(indices)


def test_empty_message_changes_nothing(merge_path: Path) -> None:
    _, merge_fn = merge_path
    target = np.arange(5, dtype=np.float32)
    outcome = run(merge_fn, target, [sparse([], 5, [], [], 8)], [1.0])
    assert outcome.bits == target.tobytes()


def test_zero_scale_and_negative_zero_scale_are_accepted(merge_path: Path) -> None:
    _, merge_fn = merge_path
    target = np.ones(4, dtype=np.float32)
    batch = [sparse([1, 2], 4, [5, 5], [0.0, -0.0], 1),
             sparse([3], 4, [1], [LIMIT_INT8], 1)]
    outcome = run(merge_fn, target, batch, [1.0, 1e-30])
    assert outcome.bits is not None
    got = np.frombuffer(outcome.bits, dtype=np.float32)
    assert got[:3].tolist() == [1.0, 1.0, 1.0]
    assert got[3] == np.float32(1.0) + np.float32(1e-30) * np.float32(LIMIT_INT8)


def test_bytearray_and_memoryview_messages_are_read_not_written(merge_path: Path
                                                                ) -> None:
    _, merge_fn = merge_path
    rng = np.random.default_rng(3)
    compressed, data, header = random_message(rng, 500, 0.1)
    batch: list[tuple[bytes, Header]] = [
        (bytearray(data), header),  # type: ignore[list-item]
        (memoryview(data), header),  # type: ignore[list-item]
    ]
    target = np.zeros(500, dtype=np.float32)
    outcome = run(merge_fn, target, batch, [1.0, 1.0])
    assert outcome.bits == expected(target, [compressed, compressed], [1.0, 1.0])


# --- targets and arguments ----------------------------------------------------------


def _bad_targets() -> list[tuple[str, object, type[Exception]]]:
    unaligned = np.frombuffer(bytearray(4 * 8 + 1), dtype=np.float32, count=8,
                              offset=1)
    readonly = np.zeros(8, dtype=np.float32)
    readonly.flags.writeable = False
    return [
        ("float64", np.zeros(8), TypeError),
        ("big-endian", np.zeros(8, dtype=">f4"), TypeError),
        ("list", [0.0] * 8, TypeError),
        ("strided", np.zeros(16, dtype=np.float32)[::2], ValueError),
        ("2-d", np.zeros((2, 4), dtype=np.float32), ValueError),
        ("read-only", readonly, ValueError),
        ("unaligned", unaligned, ValueError),
    ]


@pytest.mark.parametrize(("what", "target", "error"), _bad_targets(),
                         ids=[t[0] for t in _bad_targets()])
def test_unusable_targets_are_rejected(merge_path: Path, what: str, target: object,
                                       error: type[Exception]) -> None:
    _, merge_fn = merge_path
    batch = [sparse([1], 8, [1], [1.0], 1)]
    with pytest.raises(error):
        merge_fn(target, batch, [1.0])  # type: ignore[arg-type]
    if isinstance(target, np.ndarray) and target.flags.writeable:
        assert not target.any()


@pytest.mark.parametrize("what", ["float64", "big-endian", "list", "strided", "2-d",
                                  "read-only", "unaligned"])
def test_c_kernel_checks_targets_itself(what: str) -> None:
    kernel = pytest.importorskip("gossipfl._merge")
    target, error = {t[0]: t[1:] for t in _bad_targets()}[what]
    with pytest.raises(error):
        kernel.merge(target, [sparse([1], 8, [1], [1.0], 1)], [1.0])


def test_c_kernel_refuses_a_header_that_does_not_describe_its_bytes() -> None:
    kernel = pytest.importorskip("gossipfl._merge")
    small, small_header = sparse([1, 2], 8, [1, 1], [1.0], 8)
    large, large_header = sparse([1, 2, 3, 4, 5], 8, [1] * 5, [1.0], 8)
    target = np.zeros(8, dtype=np.float32)
    for batch in ([(small, large_header)], [(large, small_header)],
                  [(small, small_header), (large, small_header)]):
        with pytest.raises(ValueError, match="does not describe"):
            kernel.merge(target, batch, [1.0] * len(batch))
    with pytest.raises(ValueError, match="does not match"):
        kernel.merge(np.zeros(9, dtype=np.float32), [(small, small_header)], [1.0])
    with pytest.raises(ValueError, match="weights"):
        kernel.merge(target, [(small, small_header)], [])
    with pytest.raises(TypeError, match="tuple"):
        kernel.merge(target, [small], [1.0])
    assert not target.any()


def test_dimension_and_weight_mismatches_are_rejected(merge_path: Path) -> None:
    _, merge_fn = merge_path
    message = sparse([1], 8, [1], [1.0], 1)
    with pytest.raises(ValueError, match="dimension 8"):
        merge_fn(np.zeros(9, dtype=np.float32), [message], [1.0])
    with pytest.raises(ValueError, match="1 messages but 2 weights"):
        merge_fn(np.zeros(8, dtype=np.float32), [message], [1.0, 2.0])


# --- refusals -----------------------------------------------------------------------

HB = codec.HEADER_BYTES


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _int8_message(unary: bytes, low: bytes = b"", rice: int = 0, nnz: int = 3,
                  dim: int = 64, values: bytes | None = None,
                  scales: bytes | None = None) -> tuple[bytes, Header]:
    return assemble(Codec.TOPK_INT8, dim, nnz, 2, rice, unary, low,
                    values if values is not None else bytes([1] * nnz),
                    scales if scales is not None else _f32(*[1.0] * (-(-nnz // 2))))


# (name, message, exception type, reason, offset or None)
REFUSALS: list[tuple[str, tuple[bytes, Header], str, str, int | None]] = [
    # gaps 0, 0, 0 at rice 0 are the bits 111; one bit missing, one too many
    ("unary-short", _int8_message(bytes([0b1100_0000])),
     "DecodeError", "malformed", HB + 1),
    ("unary-extra-one", _int8_message(bytes([0b1111_0000])),
     "DecodeError", "malformed", HB),
    ("unary-extra-one-later-byte", _int8_message(bytes([0b1110_0000, 0b0000_0001])),
     "DecodeError", "malformed", HB),
    ("unary-trailing-zero-byte", _int8_message(bytes([0b1110_0000, 0])),
     "DecodeError", "malformed", HB),
    ("unary-third-one-in-second-byte", _int8_message(bytes([0b0000_0011, 0b1000_0000,
                                                            0])),
     "DecodeError", "malformed", HB + 1),
    ("empty-with-unary-byte", _int8_message(bytes([0]), nnz=0, values=b"",
                                            scales=b""),
     "DecodeError", "malformed", HB),
    # rice 3, three low parts = 9 bits in 2 bytes: 7 bits of padding must be zero
    ("low-padding", _int8_message(bytes([0b1110_0000]), bytes([0, 0b0000_0001]), 3),
     "DecodeError", "malformed", HB + 2),
    # a first gap of 64 zeros at rice 0 passes dimension 64
    ("gap-past-end", _int8_message(bytes(8) + bytes([0b1110_0000])),
     "MessageRefused", "index-range", None),
    # gaps 7 << 3 | 7 = 63 each (seven zeros, a one; low bits 111): every gap
    # fits, their sum does not
    ("index-past-end", _int8_message(bytes([0b0000_0001] * 3), bytes([0xFF, 0x80]),
                                     3),
     "MessageRefused", "index-range", None),
    ("gap-huge-at-max-rice", _int8_message(bytes(8) + bytes([0b1110_0000]),
                                           bytes(12), 31),
     "MessageRefused", "index-range", None),
    # values start after the 1-byte unary stream; the first -128 is the 2nd value
    ("int8-minus-128", _int8_message(bytes([0b1110_0000]),
                                     values=bytes([1, 0x80, 0x80])),
     "DecodeError", "malformed", HB + 1 + 1),
    ("scale-nan", _int8_message(bytes([0b1110_0000]), scales=_f32(1.0, math.nan)),
     "MessageRefused", "non-finite", None),
    ("scale-inf", _int8_message(bytes([0b1110_0000]), scales=_f32(math.inf, 1.0)),
     "MessageRefused", "non-finite", None),
    ("scale-negative", _int8_message(bytes([0b1110_0000]), scales=_f32(1.0, -1e-30)),
     "MessageRefused", "non-finite", None),
    ("scale-over-limit", _int8_message(
        bytes([0b1110_0000]),
        scales=_f32(1.0, float(np.nextafter(np.float32(LIMIT_INT8),
                                            np.float32(np.inf)))),
    ), "MessageRefused", "non-finite", None),
    ("int4-minus-8", sparse([0, 1, 2, 3], 8, [1, 2, 3, 4], [1.0], 4, Codec.TOPK_INT4),
     "DecodeError", "malformed", None),  # patched below
    ("int4-padding", sparse([0, 1, 2], 8, [1, 2, 3], [1.0], 4, Codec.TOPK_INT4),
     "DecodeError", "malformed", None),  # patched below
    ("dense-nan", assemble(Codec.DENSE_F32, 4, 4, 0, 0, b"", b"",
                           _f32(0.0, 1.0, math.nan, math.inf), b""),
     "MessageRefused", "non-finite", None),
    ("dense-minus-inf", assemble(Codec.DENSE_F32, 3, 3, 0, 0, b"", b"",
                                 _f32(0.0, -math.inf, 0.0), b""),
     "MessageRefused", "non-finite", None),
]


def _patch(message: tuple[bytes, Header], at: int, value: int) -> tuple[bytes, Header]:
    data, header = message
    return data[:at] + bytes([value]) + data[at + 1:], header


def _refusals() -> list[tuple[str, tuple[bytes, Header], str, str, int | None]]:
    cases = []
    for name, message, kind, reason, offset in REFUSALS:
        header = message[1]
        if name == "int4-minus-8":  # the 4th value (high nibble of byte 1) is -8
            message = _patch(message, header.values_off + 1, 0x83)
            offset = header.values_off + 1
        if name == "int4-padding":  # the unused high nibble of the last byte
            message = _patch(message, header.values_off + 1, 0x13)
            offset = header.values_off + 1
        cases.append((name, message, kind, reason, offset))
    return cases


@pytest.mark.parametrize(("name", "message", "kind", "reason", "offset"),
                         _refusals(), ids=[c[0] for c in REFUSALS])
def test_bad_payloads_are_refused_alike(merge_path: Path, name: str,
                                        message: tuple[bytes, Header], kind: str,
                                        reason: str, offset: int | None) -> None:
    _, merge_fn = merge_path
    dim = message[1].dim
    good = sparse([0], dim, [1], [1.0], 1)
    target = np.linspace(-1, 1, dim, dtype=np.float32)
    outcome = run(merge_fn, target, [good, message, good], [1.0, 1.0, 1.0])
    assert outcome.refusal is not None
    assert outcome.refusal[:3] == (kind, reason, offset)
    # The same words as the reference (which is also what run() compares for numpy).
    assert outcome == run(merge_numpy, target, [message], [1.0])


def test_a_refused_message_anywhere_in_a_batch_writes_nothing(merge_path: Path
                                                              ) -> None:
    _, merge_fn = merge_path
    rng = np.random.default_rng(11)
    good = [random_message(rng, 2000, 0.05)[1:] for _ in range(3)]
    data, header = good[1]
    bad = (data[:header.scales_off] + _f32(math.nan) + data[header.scales_off + 4:],
           header)
    target = rng.standard_normal(2000).astype(np.float32)
    for batch in ([bad, *good], [*good, bad], [good[0], bad, good[2]]):
        outcome = run(merge_fn, target, batch, [1.0] * len(batch))
        assert outcome.refusal is not None
        assert outcome.refusal[1] == "non-finite"


def test_reset_flag_and_header_fields_do_not_change_the_merge(merge_path: Path
                                                              ) -> None:
    _, merge_fn = merge_path
    rng = np.random.default_rng(5)
    compressed, data, _ = random_message(rng, 300, 0.2)
    flagged = encode(compressed, flags=codec.FLAG_RESET)
    target = np.zeros(300, dtype=np.float32)
    outcome: Outcome = run(merge_fn, target, [flagged], [0.5])
    assert outcome.bits == expected(target, [compressed], [0.5])
    assert flagged[1].reset and flagged[0] != data
