"""Checkpoints: the model and the gossip state, written atomically, read back whole.

One ``.npz`` file (no pickle) holds the model vector, each edge's public copies and
counters, and a small JSON document (round, manifest, model version). It is written
to a temporary file in the same directory, fsynced, renamed over the old one and the
directory fsynced, so a crash at any instant leaves either the old or the new
checkpoint, never a torn one. A checkpoint that does not match the running model
(other manifest or dimension) or does not parse is refused with a clear error and
left in place untouched.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .compress import F32
from .errors import StateError
from .gossip import Edge, GossipEngine
from .identity import PUBLIC_KEY_BYTES, write_private_file

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = 1
MAX_ROUND = (1 << 63) - 1
# Epochs and sequence numbers travel as uint32; a reset steps the epoch past the
# larger of both ends', so a stored one leaves room for that step.
MAX_COUNTER = (1 << 32) - 2


def save(path: Path, engine: GossipEngine) -> int:
    """Write ``engine``'s model and edges to ``path``; returns the bytes written."""
    edges = [e for e in engine.edges.values() if not e.busy]
    meta = {
        "format": FORMAT,
        "round": engine.round,
        "model_version": engine.model_version,
        "manifest": engine.manifest.hex(),
        "edges": [{"peer": e.peer.hex(), "epoch": e.epoch, "seq": e.seq,
                   "reset_epoch": e.reset_epoch} for e in edges],
    }
    arrays: dict[str, Any] = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "model": engine.model,
    }
    for n, e in enumerate(edges):
        arrays[f"mine_{n}"] = e.mine
        arrays[f"theirs_{n}"] = e.theirs
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    write_private_file(path, data)
    return len(data)


def restore(path: Path, engine: GossipEngine) -> bool:
    """Load ``path`` into ``engine``; False if there is none, StateError if unusable.

    Everything is read and checked before anything is applied, so a refused
    checkpoint leaves the engine as it was (and the file in place).
    """
    if not path.exists():
        return False
    arrays, meta = _read(path)

    # The document: format and manifest first, they explain most refusals.
    if meta.get("format") != FORMAT:
        raise StateError(f"checkpoint {path} has format {meta.get('format')!r}, "
                         f"this version reads {FORMAT}")
    if meta.get("manifest") != engine.manifest.hex():
        raise StateError(f"checkpoint {path} is for model manifest "
                         f"{meta.get('manifest')}, not this node's "
                         f"{engine.manifest.hex()}; the task or model changed")
    round_ = _count(meta.get("round"), "round", MAX_ROUND, path)
    model_version = _count(meta.get("model_version"), "model_version", MAX_ROUND,
                           path)
    entries = meta.get("edges")
    if not isinstance(entries, list):
        found = "no edges" if entries is None else f"edges = {entries!r}"
        raise _unusable(path, f"has {found}, expected a list of edges")

    # The vectors and the edges.
    dim = engine.model.size
    model = _vector(arrays["model"], dim, "the model", path)
    edges = [_edge(n, entry, arrays, dim, path) for n, entry in enumerate(entries)]

    # Validated whole: now apply.
    engine.model[:] = model
    engine.round = round_
    engine.model_version = model_version
    engine.edges.clear()
    for edge in edges:
        engine.edges[edge.peer] = edge
    return True


def _unusable(path: Path, what: str) -> StateError:
    return StateError(f"checkpoint {path} {what}; move it away to start from scratch")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays and the meta document of ``path``, or StateError."""
    try:
        # Our own file object: np.load leaks the one it opens when the zip is bad.
        with open(path, "rb") as file:
            loaded = np.load(file, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise _unusable(path, "is a single array, not an .npz archive")
            with loaded as data:
                arrays = {key: data[key] for key in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unusable(path, f"is unreadable ({type(exc).__name__}: {exc})"
                        ) from None
    missing = sorted({"meta", "model"} - set(arrays))
    if missing:
        raise _unusable(path, f"has no {' or '.join(missing)} array (found "
                              f"{sorted(arrays)})")
    try:
        meta = json.loads(arrays["meta"].tobytes())
    except ValueError as exc:
        raise _unusable(path, f"has a meta document that is not JSON ({exc})"
                        ) from None
    if not isinstance(meta, dict):
        raise _unusable(path, f"has a meta document that is a JSON "
                              f"{type(meta).__name__}, not an object")
    return arrays, meta


def _count(value: Any, where: str, limit: int, path: Path) -> int:
    """A round, version, epoch or sequence number: an int in 0..limit."""
    if not isinstance(value, int) or isinstance(value, bool) or not (
            0 <= value <= limit):
        raise _unusable(path, f"has {where} = {value!r}, expected an int in "
                              f"0..{limit}")
    return value


def _vector(array: Any, dim: int, where: str, path: Path) -> F32:
    if array.shape != (dim,) or array.dtype != np.float32:
        raise _unusable(path, f"holds {where} as a {array.dtype} vector of shape "
                              f"{array.shape}, expected float32 ({dim},)")
    if not np.isfinite(array).all():
        raise _unusable(path, f"holds NaN or Inf in {where}")
    return np.asarray(array, dtype=np.float32)


def _edge(n: int, entry: Any, arrays: dict[str, Any], dim: int, path: Path
          ) -> Edge:
    where = f"edge {n}"
    if not isinstance(entry, dict):
        raise _unusable(path, f"has {where} = {entry!r}, expected an object")
    peer_text = entry.get("peer")
    try:
        peer = bytes.fromhex(peer_text) if isinstance(peer_text, str) else b""
    except ValueError:
        peer = b""
    if len(peer) != PUBLIC_KEY_BYTES:
        raise _unusable(path, f"has {where} peer {peer_text!r}, expected "
                              f"{2 * PUBLIC_KEY_BYTES} hex digits")
    epoch = _count(entry.get("epoch"), f"{where} epoch", MAX_COUNTER, path)
    seq = _count(entry.get("seq"), f"{where} seq", MAX_COUNTER, path)
    reset_epoch = entry.get("reset_epoch")
    if reset_epoch is not None:
        reset_epoch = _count(reset_epoch, f"{where} reset_epoch", MAX_COUNTER, path)
    copies = []
    for name in (f"mine_{n}", f"theirs_{n}"):
        if name not in arrays:
            raise _unusable(path, f"has no {name} array for {where}")
        copies.append(_vector(arrays[name], dim, f"{where}'s {name}", path))
    return Edge(peer, copies[0], copies[1], epoch, seq, reset_epoch=reset_epoch)
