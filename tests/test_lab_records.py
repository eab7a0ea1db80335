"""Membership spreading beyond mDNS: seeds plus signed endpoint records.

Node 3 of a 4-node lab runs with mDNS off, as a box on another link would. Node 3
and node 0 name each other as seeds; nodes 1 and 2 know nothing of node 3. The
endpoint records that members swap over the tunnel must carry node 3 to nodes 1 and
2 (and them to node 3) until all four gossip with each other, each finding the
other through "record" where mDNS could not help.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gossipfl import labrun
from gossipfl.control import NotRunning, fetch_status
from gossipfl.identity import load_or_create_identity

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GOSSIP = {"max_rounds": 0, "round_interval_s": 0.05}
RECORDS = {"record_interval_s": 2.0}
SPREAD_TIMEOUT_S = 120.0


def status_of(lab: Any, i: int) -> dict[str, Any] | None:
    try:
        return asyncio.run(fetch_status(labrun.control_socket(lab, i), 3.0))
    except NotRunning:
        return None


@pytest.fixture
def far_lab(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    root = tmp_path / "lab"
    lab = labrun.labmod.lab_up(4, root, "r" + secrets.token_hex(3))
    procs = []
    try:
        labrun.make_mesh_key(labrun.mesh_dir(lab))
        keys = [load_or_create_identity(Path(lab.node(i).state_dir))[0]
                for i in range(4)]

        def seed(i: int) -> str:
            return f"{keys[i].node_id}@{lab.node(i).ip}:51820"

        for i in range(4):
            mesh: dict[str, Any] = dict(RECORDS)
            if i == 3:
                mesh.update(mdns=False, seeds=[seed(0)])
            if i == 0:
                mesh["seeds"] = [seed(3)]
            labrun.prepare_node(lab, i, 4, gossip=GOSSIP, mesh=mesh)
        procs = [labrun.start_node(lab, i) for i in range(4)]
        yield lab, procs
    finally:
        for i in range(4):
            log = Path(lab.node(i).state_dir) / labrun.LOG_FILE
            if log.exists():
                print(f"--- node {i} log tail ---")
                print("\n".join(log.read_text().splitlines()[-15:]))
        labrun.lab_down_all(root)
        for proc in procs:
            proc.wait(timeout=30)


def test_records_carry_a_node_without_mdns_to_peers_that_never_saw_it(
        far_lab: tuple[Any, list[Any]]) -> None:
    lab, procs = far_lab
    far = load_or_create_identity(Path(lab.node(3).state_dir))[0].node_id
    deadline = time.monotonic() + SPREAD_TIMEOUT_S
    last: dict[int, Any] = {}
    while time.monotonic() < deadline:
        for i, proc in enumerate(procs):
            assert proc.poll() is None, f"node {i} exited with {proc.returncode}"
        last = {i: status_of(lab, i) for i in range(4)}
        if all(last.values()) and spread(last, far):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"node 3 did not spread by records: {summary(last, far)}")
    for i in (1, 2):
        peer = next(p for p in last[i]["peers"] if p["id"] == far)
        assert "record" in peer["sources"] and "mdns" not in peer["sources"]
    assert last[3]["mesh"]["mdns_instance"] is None


def spread(statuses: dict[int, Any], far: str) -> bool:
    """Nodes 1 and 2 exchanged with node 3, and node 3 with all three."""
    for i in (1, 2):
        peer = next((p for p in statuses[i]["peers"] if p["id"] == far), None)
        if peer is None or peer["exchanges"] == 0:
            return False
    return sum(p["exchanges"] > 0 for p in statuses[3]["peers"]) == 3


def summary(statuses: dict[int, Any], far: str) -> str:
    out = []
    for i, s in statuses.items():
        if s is None:
            out.append(f"node {i}: not answering")
            continue
        peers = ", ".join(f"{p['short_id']}[{'/'.join(p['sources'])}:{p['exchanges']}]"
                          for p in s["peers"])
        out.append(f"node {i}: {peers}")
    return "; ".join(out) + f" (node 3 is {far[:8]})"
