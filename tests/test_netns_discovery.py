"""mDNS discovery across the lab bridge, with real zeroconf in separate processes.

Five nodes: 0, 1, 2 are members; 3 holds a valid certificate from another mesh; 4 is
a clone of node 0 (same identity files). Needs root; CI runs it as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.lines import JsonLines, collect_until

from gossipfl import lab as labmod
from gossipfl import membership as mb
from gossipfl.identity import IDENTITY_FILE, load_or_create_identity

pytestmark = pytest.mark.netns

HELPER = Path(__file__).parent / "helpers" / "mdns_node.py"
REPO = Path(__file__).parent.parent
ENV = {
    # The caller's PYTHONPATH is kept so that another zeroconf can be tried.
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    ),
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
}
FIND_S = 15.0


def _events(reader: JsonLines, name: str) -> list[dict[str, Any]]:
    return [e for e in reader.seen if e.get("event") == name]


@pytest.fixture
def nodes(
    make_lab: Callable[[int], labmod.Lab], tmp_path: Path
) -> Iterator[tuple[labmod.Lab, list[bytes], list[JsonLines]]]:
    lab = make_lab(5)
    mesh_dir, other_dir = tmp_path / "mesh", tmp_path / "other-mesh"
    mb.create_mesh(mesh_dir)
    mb.create_mesh(other_dir)
    keys = []
    for i in range(4):
        state = Path(lab.nodes[i].state_dir)
        identity = load_or_create_identity(state)[0]
        issuer = mesh_dir if i < 3 else other_dir
        cert = mb.sign_node(issuer, identity.node_id, f"node-{i}")
        mb.join_mesh(state, identity, cert.to_text(), (issuer / "mesh.pub").read_text())
        keys.append(identity.public_key)
    clone = Path(lab.nodes[4].state_dir)
    for name in (IDENTITY_FILE, mb.MESH_PUB_FILE, mb.NODE_CERT_FILE):
        shutil.copy2(Path(lab.nodes[0].state_dir) / name, clone / name)
    keys.append(keys[0])

    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i, node in enumerate(lab.nodes):
            log = open(tmp_path / f"node{i}.log", "wb")  # noqa: SIM115
            logs.append(log)
            argv = [sys.executable, str(HELPER), "--state", node.state_dir]
            procs.append(
                labmod.lab_spawn(
                    lab,
                    i,
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=ENV,
                )
            )
        readers = [JsonLines(p) for p in procs]
        for reader in readers:
            started = reader.wait_for("started", 20)
        print("zeroconf", started["zeroconf"])  # shown with -s or on failure
        yield lab, keys, readers
    finally:
        for proc in procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for log in logs:
            log.close()


def _send(reader: JsonLines, line: str) -> None:
    assert reader.proc.stdin is not None
    reader.proc.stdin.write(line.encode() + b"\n")
    reader.proc.stdin.flush()


def test_members_find_each_other_and_refuse_strangers_and_clones(
    nodes: tuple[labmod.Lab, list[bytes], list[JsonLines]],
) -> None:
    lab, keys, readers = nodes
    ips = [n.ip for n in lab.nodes]
    members = [0, 1, 2]

    def seen_keys(i: int) -> set[str]:
        return {e["pk"] for e in _events(readers[i], "peer_seen")}

    def strangers(i: int) -> set[tuple[str, str]]:
        return {(e["pk"], e["why"]) for e in _events(readers[i], "stranger_seen")}

    def duplicates(i: int) -> set[str]:
        return {e["address"] for e in _events(readers[i], "duplicate_identity")}

    def done() -> bool:
        return (
            all(
                seen_keys(i) >= {keys[j].hex() for j in members if j != i}
                and (keys[3].hex(), mb.WRONG_MESH) in strangers(i)
                for i in members
            )
            and ips[4] in duplicates(0)
            and ips[0] in duplicates(4)
        )

    found = collect_until(readers, done, FIND_S)
    summary = {i: r.seen for i, r in enumerate(readers)}
    assert found, f"discovery incomplete after {FIND_S} s: {summary}"

    # The stranger is never a peer; nobody takes its own key for a peer.
    for i in (0, 1, 2, 4):
        assert keys[3].hex() not in seen_keys(i)
    assert keys[0].hex() not in seen_keys(0) | seen_keys(4)
    # Endpoints are the underlay address and the advertised WireGuard port.
    for event in _events(readers[0], "peer_seen"):
        if event["pk"] == keys[1].hex():
            assert event["endpoint"] == [ips[1], 51820]
            assert event["how"] == "mdns" and event["gossip_port"] == 8080

    # Our own node says so in its status.
    _send(readers[0], "status")
    status = readers[0].wait_for("status", 10)
    assert ips[4] in status["duplicate_identity"]
    assert status["addresses"] == [ips[0]]

    # A new underlay address is announced again and peers learn it.
    labmod.lab_exec(lab, 1, ["ip", "addr", "add", "198.51.100.111/24", "dev", "ul0"])
    moved = collect_until(
        readers,
        lambda: any(
            e["pk"] == keys[1].hex() and ["198.51.100.111", 51820] in e["endpoints"]
            for e in _events(readers[0], "peer_seen")
        ),
        FIND_S,
    )
    assert moved, f"node 0 never saw node 1's new address: {readers[0].seen}"

    # A member that leaves is lost after the grace period (5 s in the helper).
    _send(readers[2], "quit")
    readers[2].wait_for("stopped", 15)
    lost = collect_until(
        readers[:2],
        lambda: all(
            keys[2].hex() in {e["pk"] for e in _events(readers[i], "peer_lost")}
            for i in (0, 1)
        ),
        15,
    )
    assert lost, f"peer 2 not reported lost: {[r.seen for r in readers[:2]]}"
