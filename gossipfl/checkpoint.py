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
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateError
from .gossip import Edge, GossipEngine
from .identity import write_private_file

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = 1


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
    """Load ``path`` into ``engine``; False if there is none, StateError if unusable."""
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise StateError(f"checkpoint {path} is unreadable ({exc}); move it away to "
                         "start from scratch") from None
    if meta.get("format") != FORMAT:
        raise StateError(f"checkpoint {path} has format {meta.get('format')!r}, "
                         f"this version reads {FORMAT}")
    if meta.get("manifest") != engine.manifest.hex():
        raise StateError(f"checkpoint {path} is for model manifest "
                         f"{meta.get('manifest')}, not this node's "
                         f"{engine.manifest.hex()}; the task or model changed")
    model = arrays["model"]
    dim = engine.model.size
    if model.shape != (dim,) or model.dtype != np.float32:
        raise StateError(f"checkpoint {path} holds a {model.dtype} vector of shape "
                         f"{model.shape}, expected float32 ({dim},)")
    edges = []
    for n, entry in enumerate(meta["edges"]):
        mine, theirs = arrays[f"mine_{n}"], arrays[f"theirs_{n}"]
        if mine.shape != (dim,) or theirs.shape != (dim,):
            raise StateError(f"checkpoint {path}: edge {n} copies have the wrong shape")
        edges.append(Edge(bytes.fromhex(entry["peer"]), mine.astype(np.float32),
                          theirs.astype(np.float32), int(entry["epoch"]),
                          int(entry["seq"]), reset_epoch=entry.get("reset_epoch")))
    # Validated whole: now apply.
    engine.model[:] = model
    engine.round = int(meta["round"])
    engine.model_version = int(meta["model_version"])
    engine.edges.clear()
    for edge in edges:
        engine.edges[edge.peer] = edge
    return True
