"""Mesh keys, addresses, UAPI/wg parsing, and both backends against fakes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from gossipfl import mesh
from gossipfl.errors import MeshError, MessageRefused
from gossipfl.identity import Identity

FAKE_WG = Path(__file__).parent / "helpers" / "fake_wireguard_go.py"
ADDR = ipaddress.IPv6Interface("fd12:3456:789a::1/64")


class Recorder:
    """A command runner that records argv and answers from a script."""

    def __init__(self, fail_on: str | None = None, dump: str = "") -> None:
        self.calls: list[list[str]] = []
        self.stdin: list[bytes | None] = []
        self.fail_on = fail_on
        self.dump = dump

    async def __call__(self, argv: Sequence[str], stdin: bytes | None) -> str:
        self.calls.append(list(argv))
        self.stdin.append(stdin)
        if self.fail_on is not None and self.fail_on in " ".join(argv):
            raise MeshError(f"{' '.join(argv)} failed with exit 2: nope")
        if argv[:2] == ["wg", "show"]:
            return self.dump
        return ""


# Keys and addresses.


def test_wireguard_key_follows_from_the_ed25519_key() -> None:
    node = Identity.generate()
    private = mesh.wg_private_key(node)
    assert bytes(PrivateKey(private).public_key) == mesh.wg_public_key(node.public_key)


def test_invalid_ed25519_key_is_refused() -> None:
    with pytest.raises(MessageRefused) as info:
        mesh.wg_public_key(bytes(32))
    assert info.value.reason == mesh.BAD_KEY


def test_addresses_are_deterministic_ula_inside_the_mesh_prefix() -> None:
    mesh_key, other_mesh = Identity.generate(), Identity.generate()
    node = Identity.generate()
    prefix = mesh.mesh_prefix(mesh_key.public_key)

    assert prefix.prefixlen == 64
    assert prefix.network_address.packed[0] == 0xFD
    address = mesh.mesh_address(mesh_key.public_key, node.public_key)
    assert address in prefix
    assert address == mesh.mesh_address(mesh_key.public_key, node.public_key)
    assert mesh.mesh_prefix(other_mesh.public_key) != prefix
    interface = mesh.mesh_interface(mesh_key.public_key, node.public_key)
    assert interface.ip == address and interface.network == prefix


def test_reserved_host_parts() -> None:
    assert mesh._reserved_host(0)
    assert mesh._reserved_host((1 << 64) - 1)
    assert not mesh._reserved_host(12345)


def test_address_collision_is_refused_and_released() -> None:
    fixed = ipaddress.IPv6Address("fd00::1")
    table = mesh.AddressTable(b"m" * 32, address_of=lambda m, n: fixed)
    a, b = Identity.generate().public_key, Identity.generate().public_key

    assert table.claim(a) == fixed
    assert table.claim(a) == fixed  # the same key again is fine
    with pytest.raises(MessageRefused) as info:
        table.claim(b)
    assert info.value.reason == mesh.ADDRESS_COLLISION
    table.release(a)
    assert table.claim(b) == fixed and table.owner(fixed) == b


# Parsing.


def test_parse_uapi_get() -> None:
    key1, key2 = b"\x01" * 32, b"\x02" * 32
    text = (
        f"private_key={'ab' * 32}\nlisten_port=51820\n"
        f"public_key={key1.hex()}\nendpoint=198.51.100.11:51820\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
        "rx_bytes=10\ntx_bytes=20\npersistent_keepalive_interval=25\n"
        "allowed_ip=fd00::1/128\nallowed_ip=fd00::2/128\n"
        f"public_key={key2.hex()}\nendpoint=[2001:db8::1]:7\n"
        "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
        "rx_bytes=0\ntx_bytes=0\n"
    )
    first, second = mesh.parse_uapi_get(text)
    assert first == mesh.WgPeerStats(
        key1,
        ("198.51.100.11", 51820),
        1700000000.5,
        10,
        20,
        ("fd00::1/128", "fd00::2/128"),
        25,
    )
    assert second.endpoint == ("2001:db8::1", 7)
    assert second.last_handshake_s is None


def test_parse_wg_dump() -> None:
    key = b"\x03" * 32
    text = (
        "priv\tpub\t51820\toff\n"
        f"{mesh.wg_key_text(key)}\t(none)\t198.51.100.12:51820\tfd00::3/128\t"
        "1700000001\t5\t6\t25\n"
    )
    (peer,) = mesh.parse_wg_dump(text)
    assert peer == mesh.WgPeerStats(
        key, ("198.51.100.12", 51820), 1700000001.0, 5, 6, ("fd00::3/128",), 25
    )


def test_uapi_set_peer_text() -> None:
    text = mesh.uapi_set_peer(b"\x04" * 32, ("198.51.100.1", 9), ["fd00::4/128"], 25)
    assert text == (
        f"set=1\npublic_key={'04' * 32}\nendpoint=198.51.100.1:9\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=fd00::4/128\n\n"
    )


# Kernel backend against a recording runner.


def test_kernel_backend_issues_ip_and_wg_commands() -> None:
    dump = f"x\tx\t1\toff\n{mesh.wg_key_text(b'5' * 32)}\t(none)\t(none)\t(none)"
    dump += "\t0\t0\t0\toff\n"
    runner = Recorder(dump=dump)

    async def scenario() -> list[mesh.WgPeerStats]:
        backend = mesh.KernelBackend(runner)
        await backend.up("gfl0", b"k" * 32, 51820, ADDR, 1400)
        await backend.set_peer(b"5" * 32, ("198.51.100.11", 51820), ["fd00::5"], 25)
        stats = await backend.peers()
        await backend.remove_peer(b"5" * 32)
        await backend.down()
        await backend.down()  # twice is harmless
        return stats

    stats = asyncio.run(scenario())
    assert runner.calls[0] == ["ip", "link", "add", "dev", "gfl0", "type", "wireguard"]
    assert runner.calls[1][:5] == ["wg", "set", "gfl0", "private-key", "/dev/stdin"]
    assert runner.stdin[1] == mesh.wg_key_text(b"k" * 32).encode() + b"\n"
    assert ["ip", "-6", "addr", "add", str(ADDR), "dev", "gfl0", "nodad"] in (
        runner.calls
    )
    assert ["ip", "link", "set", "dev", "gfl0", "mtu", "1400", "up"] in runner.calls
    assert runner.calls[4][-2:] == ["allowed-ips", "fd00::5/128"]
    assert runner.calls[-1] == ["ip", "link", "del", "dev", "gfl0"]
    assert stats[0].endpoint is None and stats[0].last_handshake_s is None


def test_kernel_backend_cleans_up_when_up_fails_halfway() -> None:
    runner = Recorder(fail_on="private-key")

    async def scenario() -> None:
        backend = mesh.KernelBackend(runner)
        with pytest.raises(MeshError, match=r"private-key .* nope"):
            await backend.up("gfl0", b"k" * 32, 51820, ADDR)
        assert backend.ifname is None

    asyncio.run(scenario())
    assert runner.calls[-1] == ["ip", "link", "del", "dev", "gfl0"]


def test_up_refuses_bad_arguments() -> None:
    async def scenario() -> None:
        backend = mesh.KernelBackend(Recorder())
        with pytest.raises(MeshError, match="interface name"):
            await backend.up("this-name-is-too-long", b"k" * 32, 1, ADDR)
        with pytest.raises(MeshError, match="MTU 1000"):
            await backend.up("gfl0", b"k" * 32, 1, ADDR, mtu=1000)
        with pytest.raises(MeshError, match="not up"):
            await backend.peers()

    asyncio.run(scenario())


def test_choose_backend_probes_the_kernel_then_falls_back() -> None:
    async def scenario() -> None:
        ok = Recorder()
        assert (await mesh.choose_backend(runner=ok)).kind == "kernel"
        assert ok.calls[0][:3] == ["ip", "link", "add"]
        assert ok.calls[1][:3] == ["ip", "link", "del"]

        no_kernel = Recorder(fail_on="type wireguard")
        uc = mesh.UserspaceConfig(argv=(sys.executable,))
        chosen = await mesh.choose_backend(runner=no_kernel, userspace=uc)
        assert chosen.kind == "userspace"
        with pytest.raises(MeshError, match="kernel WireGuard is not available"):
            await mesh.choose_backend("kernel", runner=no_kernel)
        missing = mesh.UserspaceConfig(argv=("no-such-wireguard-go",))
        with pytest.raises(MeshError, match="no-such-wireguard-go"):
            await mesh.choose_backend(runner=no_kernel, userspace=missing)

    asyncio.run(scenario())


def test_run_command_names_the_command_and_its_stderr() -> None:
    async def scenario() -> None:
        assert await mesh.run_command(["echo", "hi"]) == "hi\n"
        with pytest.raises(MeshError, match=r"sh -c .* exit 3: oops"):
            await mesh.run_command(["sh", "-c", "echo oops >&2; exit 3"])
        with pytest.raises(MeshError, match="failed to run"):
            await mesh.run_command(["/nonexistent/tool"])

    asyncio.run(scenario())


# Userspace backend against the fake wireguard-go.


def _fake_config(tmp_path: Path, *extra: str, **kw: float) -> mesh.UserspaceConfig:
    return mesh.UserspaceConfig(
        argv=(sys.executable, str(FAKE_WG), "--socket-dir", str(tmp_path), *extra),
        socket_dir=tmp_path,
        restart_backoff_s=0.0,
        **kw,  # type: ignore[arg-type]
    )


async def _wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_userspace_backend_configures_through_uapi(tmp_path: Path) -> None:
    runner = Recorder()
    peer = b"\x07" * 32

    async def scenario() -> None:
        backend = mesh.UserspaceBackend(_fake_config(tmp_path), runner)
        await backend.up("gfl0", b"\x09" * 32, 51999, ADDR)
        assert backend.kind == "userspace"
        await backend.set_peer(peer, ("198.51.100.11", 51820), ["fd00::7/128"], 5)
        (stats,) = await backend.peers()
        assert stats.public_key == peer
        assert stats.endpoint == ("198.51.100.11", 51820)
        assert stats.allowed_ips == ("fd00::7/128",)
        assert stats.keepalive_s == 5
        again = (await backend.peers())[0]
        assert again.rx_bytes > stats.rx_bytes and again.tx_bytes > stats.tx_bytes
        await backend.remove_peer(peer)
        assert await backend.peers() == []
        pid = backend.pid
        await backend.down()
        assert pid is not None and not _alive(pid)

    asyncio.run(scenario())
    assert not (tmp_path / "gfl0.sock").exists()
    assert ["ip", "link", "set", "dev", "gfl0", "mtu", "1420", "up"] in runner.calls


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it counts as dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_userspace_backend_restarts_a_dead_child_and_replays_peers(
    tmp_path: Path,
) -> None:
    peer = b"\x08" * 32

    async def scenario() -> None:
        backend = mesh.UserspaceBackend(_fake_config(tmp_path), Recorder())
        await backend.up("gfl0", b"\x09" * 32, 51999, ADDR)
        await backend.set_peer(peer, None, ["fd00::8/128"], 0)
        first = backend.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)

        await _wait_until(lambda: backend.restarts == 1 and backend.pid != first)
        await _wait_until(lambda: (tmp_path / "gfl0.sock").exists())
        await _wait_until(lambda: backend._lock.locked() is False)
        (stats,) = await backend.peers()
        assert stats.public_key == peer
        assert backend.failure is None
        await backend.down()

    asyncio.run(scenario())


def test_userspace_backend_gives_up_after_max_restarts(tmp_path: Path) -> None:
    failures: list[MeshError] = []

    async def scenario() -> None:
        config = _fake_config(tmp_path, max_restarts=0)
        backend = mesh.UserspaceBackend(config, Recorder(), failures.append)
        await backend.up("gfl0", b"\x09" * 32, 51999, ADDR)
        assert backend.pid is not None
        os.kill(backend.pid, signal.SIGKILL)
        await _wait_until(lambda: backend.failure is not None)
        with pytest.raises(MeshError, match="giving up"):
            await backend.peers()
        await backend.down()

    asyncio.run(scenario())
    assert len(failures) == 1 and "exited with -9" in str(failures[0])


def test_userspace_child_dying_at_start_is_reported_with_its_output(
    tmp_path: Path,
) -> None:
    runner = Recorder()

    async def scenario() -> None:
        config = _fake_config(tmp_path, "--exit-before-socket", "3")
        backend = mesh.UserspaceBackend(config, runner)
        with pytest.raises(MeshError, match=r"exited with 3.*cannot create tun"):
            await backend.up("gfl0", b"\x09" * 32, 51999, ADDR)
        assert backend.pid is None

    asyncio.run(scenario())


def test_userspace_refuses_an_interface_served_by_someone_else(
    tmp_path: Path,
) -> None:
    (tmp_path / "gfl0.sock").touch()

    async def scenario() -> None:
        backend = mesh.UserspaceBackend(_fake_config(tmp_path), Recorder())
        with pytest.raises(MeshError, match="another wireguard-go"):
            await backend.up("gfl0", b"\x09" * 32, 51999, ADDR)

    asyncio.run(scenario())
