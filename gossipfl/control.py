"""Client side of a node's control socket, and the human form of its status.

``gossipfl status`` exits 0 when the node is healthy, 1 when it runs but is degraded
(no live peer, no recent exchange, a duplicate identity), and 3 when nothing answers
on the socket.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from .compress import F32

EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_NOT_RUNNING = 3


class NotRunning(Exception):
    """No node answers on the control socket."""


async def fetch(socket: Path, path: str, timeout_s: float = 5.0) -> bytes:
    if not socket.exists():
        raise NotRunning(f"no control socket at {socket}")
    connector = aiohttp.UnixConnector(path=str(socket))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (aiohttp.ClientSession(connector=connector, timeout=timeout) as s,
                    s.get(f"http://node{path}") as response):
            response.raise_for_status()
            return await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        why = str(exc) or type(exc).__name__
        raise NotRunning(f"node at {socket} does not answer: {why}") from None


async def fetch_status(socket: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await fetch(socket, "/v1/status", timeout_s))
    return data


async def fetch_model(socket: Path, timeout_s: float = 5.0) -> F32:
    return np.frombuffer(await fetch(socket, "/v1/model", timeout_s), dtype="<f4")


def exit_code(status: dict[str, Any]) -> int:
    return EXIT_HEALTHY if status.get("healthy") else EXIT_DEGRADED


def _ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "never"
    return f"{now - timestamp:.1f}s ago"


def _kb(n: int) -> str:
    return f"{n / 1024:.1f}K"


def render_status(status: dict[str, Any]) -> str:
    """The status as an operator reads it in a terminal."""
    now = time.time()
    node = status["node"]
    acc = status.get("accuracy")
    health = "healthy" if status["healthy"] else (
        "DEGRADED: " + "; ".join(status["problems"]))
    lines = [
        f"node      {node['short_id']}  {node['name']}  (pid {node['pid']}, "
        f"gossipfl {status['version']})",
        f"state     {status['state']}  {health}",
        f"round     {status['round']}   model version {status['model_version']}   "
        f"accuracy {'-' if acc is None else f'{acc:.4f}'}",
        f"task      {status['task']}  {status['parameters']} parameters  "
        f"compression {status['compression']}  merge {status['merge_path']}",
        f"traffic   sent {_kb(status['bytes_sent'])}  received "
        f"{_kb(status['bytes_received'])}  (dense would be "
        f"{_kb(status['dense_equivalent_sent'])})",
    ]
    for key in ("mesh",):
        if key in status:
            mesh = status[key]
            lines.append(f"mesh      {mesh.get('interface')}  backend "
                         f"{mesh.get('backend')}  address {mesh.get('address')}")
    lines.append("")
    lines.append(f"{'peer':10}{'name':14}{'state':9}{'last exchange':16}"
                 f"{'n':>6}{'in':>10}{'out':>10}  source")
    for p in status["peers"]:
        lines.append(f"{p['short_id']:10}{p['name'][:13]:14}{p['state']:9}"
                     f"{_ago(p['last_exchange'], now):16}{p['exchanges']:>6}"
                     f"{_kb(p['bytes_in']):>10}{_kb(p['bytes_out']):>10}  "
                     f"{','.join(p['sources'])}")
        wg = p.get("mesh")
        if wg:
            lines.append(f"{'':10}wireguard {wg['endpoint'] or '-'}  handshake "
                         f"{_ago(wg['latest_handshake'], now)}  rx "
                         f"{_kb(wg['wg_rx_bytes'])} tx {_kb(wg['wg_tx_bytes'])}  "
                         f"{wg['mesh_address']}")
    if status["refused"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(status["refused"].items()))
        lines.append(f"\nrefused   {reasons}")
    for stranger in status.get("strangers", []):
        lines.append(f"stranger  {stranger['id'][:8]} at {stranger['address']}: "
                     f"{stranger['messages']} message(s) refused "
                     f"({stranger['reason']})")
    for where in status.get("duplicate_identity", []):
        lines.append(f"DUPLICATE IDENTITY: a node at {where} uses this node's key")
    return "\n".join(lines)
