"""The mesh agent of ``gossipfl up`` with a fake WireGuard backend: what discovery
reports becomes WireGuard peers and gossip peers, and endpoint records spread."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from gossipfl import discovery as disc
from gossipfl import membership as mb
from gossipfl import mesh
from gossipfl.config import MeshSection, config_from_dict
from gossipfl.errors import DecodeError, MessageRefused
from gossipfl.identity import Identity
from gossipfl.node import Node
from gossipfl.up import MeshAgent, pack_records, unpack_records

MESH_KEY = SigningKey(b"\x42" * 32)
OTHER_MESH = SigningKey(b"\x43" * 32)
IDS = [Identity.from_seed(bytes([i + 60]) * 32) for i in range(4)]


def membership(identity: Identity, key: SigningKey = MESH_KEY) -> mb.Membership:
    cert = mb.issue_certificate(key, identity.public_key, "n", int(time.time()) - 10)
    return mb.Membership(bytes(MESH_KEY.verify_key), cert)


class FakeBackend(mesh.WireGuardBackend):
    kind = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.set: dict[bytes, tuple[Any, tuple[str, ...]]] = {}

    async def set_peer(self, public_key: bytes, endpoint: tuple[str, int] | None,
                       allowed_ips: Any, keepalive_s: int = 25) -> None:
        self.set[public_key] = (endpoint, tuple(allowed_ips))

    async def remove_peer(self, public_key: bytes) -> None:
        self.set.pop(public_key, None)

    async def peers(self) -> list[mesh.WgPeerStats]:
        return []

    async def _create(self) -> None: ...

    async def _set_peer(self, public_key: bytes, peer: Any) -> None: ...

    async def _remove_peer(self, public_key: bytes) -> None: ...

    async def _destroy(self, ifname: str) -> None: ...


def agent(tmp_path: Path, me: int = 0) -> tuple[MeshAgent, FakeBackend]:
    config = config_from_dict({"node": {"state_dir": str(tmp_path / f"s{me}")},
                               "mesh": {}}, tmp_path)
    node = Node(config, IDS[me])
    backend = FakeBackend()
    assert config.mesh is not None
    return MeshAgent(node, membership(IDS[me]), backend, config.mesh), backend


def seen(i: int, how: str = "mdns") -> disc.DiscoveredPeer:
    return disc.DiscoveredPeer(IDS[i].public_key, (f"198.51.100.{10 + i}", 51820),
                               7400, how, membership(IDS[i]).cert)


def drain(agent: MeshAgent) -> None:
    async def run() -> None:
        task = asyncio.create_task(agent._apply_ops())
        while not agent._ops.empty():
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())


def test_a_discovered_member_becomes_a_wireguard_peer_and_a_gossip_peer(
        tmp_path: Path) -> None:
    a, backend = agent(tmp_path)
    a.peer_seen(seen(1))
    drain(a)
    wg_key = mesh.wg_public_key(IDS[1].public_key)
    address = mesh.mesh_address(a.mesh_public_key, IDS[1].public_key)
    assert backend.set[wg_key] == (("198.51.100.11", 51820), (f"{address}/128",))
    peer = a.node.peers.peers[IDS[1].public_key]
    assert peer.address == f"http://[{address}]:7400"
    assert a.node.peers.is_member(IDS[1].public_key)


def test_a_lost_peer_leaves_only_when_no_source_vouches_for_it(tmp_path: Path
                                                                ) -> None:
    a, backend = agent(tmp_path)
    a.peer_seen(seen(1, "mdns"))
    a.peer_seen(seen(1, "record"))
    a.peer_lost(IDS[1].public_key)
    drain(a)
    assert IDS[1].public_key in a.node.peers.peers  # the record still vouches
    a._drop(IDS[1].public_key, "record")
    drain(a)
    assert IDS[1].public_key not in a.node.peers.peers
    assert backend.set == {}


def test_an_address_collision_is_refused(tmp_path: Path) -> None:
    a, backend = agent(tmp_path)
    a.table = mesh.AddressTable(a.mesh_public_key,
                                lambda mesh_key, node: mesh.mesh_address(mesh_key,
                                                                         b"x" * 32))
    a.table.claim(IDS[2].public_key)
    a.peer_seen(seen(1))
    drain(a)
    assert backend.set == {} and a.node.refused.get("address_collision") == 1


def test_strangers_and_duplicates_show_in_status(tmp_path: Path) -> None:
    a, _ = agent(tmp_path)
    a.stranger_seen(IDS[3].public_key, "wrong_mesh")
    a.duplicate_identity("198.51.100.99")
    status = a.node.status()
    assert status["strangers"][0]["id"] == IDS[3].public_key.hex()
    assert status["strangers"][0]["reason"] == "wrong_mesh"
    assert status["duplicate_identity"] == ["198.51.100.99"]
    assert not status["healthy"]
    assert IDS[3].public_key not in a.node.peers.peers


def record(i: int, when: float, key: SigningKey = MESH_KEY) -> bytes:
    return disc.encode_endpoint_record(IDS[i], membership(IDS[i], key),
                                       [(f"203.0.113.{i + 1}", 51820)], 7400, when)


def test_endpoint_records_add_members_and_keep_the_newest(tmp_path: Path) -> None:
    a, backend = agent(tmp_path)
    now = time.time()
    a.take_records([record(2, now - 5)], "test")
    drain(a)
    wg_key = mesh.wg_public_key(IDS[2].public_key)
    assert backend.set[wg_key][0] == ("203.0.113.3", 51820)
    assert "record" in a.node.peers.peers[IDS[2].public_key].sources
    newer = record(2, now)
    a.take_records([newer, record(2, now - 60)], "test")
    assert a.records[IDS[2].public_key][1] == newer
    # our own record and a record from another mesh change nothing
    a.take_records([record(0, now), record(3, now, OTHER_MESH)], "test")
    assert IDS[3].public_key not in a.node.peers.peers
    assert IDS[0].public_key not in a.node.peers.peers


def test_records_body_round_trips_and_refuses_bad_framing() -> None:
    blobs = [b"a", b"bb" * 100, b""]
    assert unpack_records(pack_records(blobs)) == blobs
    with pytest.raises(DecodeError):
        unpack_records(pack_records(blobs)[:-1])
    with pytest.raises(DecodeError):
        unpack_records(pack_records(blobs) + b"\0")
    with pytest.raises(MessageRefused, match="oversized"):
        unpack_records(b"\0" * (70 * 1024))
    with pytest.raises(MessageRefused, match="records exceed"):
        unpack_records(b"\xff\xff")


def test_a_mesh_section_is_validated() -> None:
    from gossipfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mesh\.backend 'vpn'"):
        config_from_dict({"mesh": {"backend": "vpn"}}, Path("."))
    with pytest.raises(ConfigError, match=r"mesh\.mtu = 100"):
        config_from_dict({"mesh": {"mtu": 100}}, Path("."))
    with pytest.raises(ConfigError, match=r"mesh\.seeds must be a list"):
        config_from_dict({"mesh": {"seeds": "x"}}, Path("."))
    assert isinstance(config_from_dict({"mesh": {}}, Path(".")).mesh, MeshSection)


def test_down_never_signals_a_process_that_merely_reuses_a_recorded_pid(
        tmp_path: Path) -> None:
    import json
    import subprocess

    from gossipfl import procs
    from gossipfl.up import STATE_FILE, main_down

    config = config_from_dict({"node": {"state_dir": str(tmp_path / "s")},
                               "mesh": {"interface": "gfltest9"}}, tmp_path)
    (tmp_path / "s").mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        started = procs.start_time(bystander.pid)
        assert started is not None
        state = tmp_path / "s" / STATE_FILE
        # The same pid, but not the process that was recorded (another start time).
        state.write_text(json.dumps({"pid": bystander.pid, "pid_start": started - 1,
                                     "wg_pid": bystander.pid,
                                     "wg_pid_start": started - 1}))
        assert main_down(config) == 0
        assert bystander.poll() is None, "an unrelated process was signalled"
        assert not state.exists()
        # The very process that was recorded is stopped.
        state.write_text(json.dumps({"pid": bystander.pid, "pid_start": started}))
        assert main_down(config) == 0
        assert bystander.wait(timeout=10) is not None
    finally:
        bystander.kill()
        bystander.wait()
