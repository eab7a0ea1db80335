"""The worked example in docs/wire-format.md decodes to what the text says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from gossipfl import codec
from gossipfl.codec import Kind
from gossipfl.compress import Codec
from gossipfl.merge import MergeFn

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"


def example_bytes() -> bytes:
    text = DOC.read_text()
    dump = text.split("<!-- wire-example-begin -->")[1].split(
        "<!-- wire-example-end -->")[0]
    rows = re.findall(r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} ?)+)$", dump, re.MULTILINE)
    return bytes.fromhex("".join(rows))


def test_worked_example_parses_verifies_and_decodes(
        merge_path: tuple[str, MergeFn]) -> None:
    _, merge_fn = merge_path
    data = example_bytes()
    header = codec.parse_header(data, codec.max_message_bytes(16))
    codec.verify_signature(data, header)
    assert (header.kind, header.codec, header.dim, header.nnz, header.block,
            header.rice, header.round, header.epoch, header.seq) == (
        Kind.REQUEST, Codec.TOPK_INT8, 16, 4, 2, 1, 3, 1, 5)
    target = np.zeros(16, dtype=np.float32)
    merge_fn(target, [(data, header)], [1.0])
    assert np.flatnonzero(target).tolist() == [1, 4, 5, 13]
    assert target[[1, 4, 5, 13]].tolist() == pytest.approx([1.0, -0.03, 63.5, -63.5])


def test_worked_example_matches_the_encoder() -> None:
    script = DOC.parent.parent / "benchmarks" / "wire_example.py"
    spec = importlib.util.spec_from_file_location("wire_example", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.example() == example_bytes()
