"""Real WireGuard (wireguard-go) between lab namespaces, and lab teardown.

Needs root and wireguard-go; CI runs these as root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.lines import JsonLines

from gossipfl import lab as labmod
from gossipfl import mesh
from gossipfl.identity import load_or_create_identity

pytestmark = pytest.mark.netns

HELPERS = Path(__file__).parent / "helpers"
REPO = Path(__file__).parent.parent
ENV = {
    # The caller's PYTHONPATH is kept so that another zeroconf can be tried.
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    ),
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
}


def _reap(procs: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_three_nodes_handshake_and_talk_over_mesh_addresses(
    make_lab: Callable[[int], labmod.Lab],
) -> None:
    lab = make_lab(3)
    ids = [load_or_create_identity(Path(n.state_dir))[0] for n in lab.nodes]
    mesh_pub = os.urandom(32)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, node in enumerate(lab.nodes):
            peers = [
                f"--peer={ids[j].public_key.hex()}@{other.ip}:51820"
                for j, other in enumerate(lab.nodes)
                if j != i
            ]
            argv = [
                sys.executable,
                str(HELPERS / "wg_node.py"),
                "--state",
                node.state_dir,
                "--mesh-pub",
                mesh_pub.hex(),
                "--timeout",
                "30",
                *peers,
            ]
            procs.append(
                labmod.lab_spawn(
                    lab, i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV
                )
            )
        readers = [JsonLines(p) for p in procs]

        for i, reader in enumerate(readers):
            ready = reader.wait_for("ready", 20)
            assert ready["kind"] == "userspace"
            expected = mesh.mesh_address(mesh_pub, ids[i].public_key)
            assert ready["address"] == str(expected)
        for i, reader in enumerate(readers):
            result = reader.wait_for("result", 60)
            assert len(result["peers"]) == 2
            for peer in result["peers"]:
                j = [k.public_key.hex() for k in ids].index(peer["peer"])
                assert peer == {
                    "peer": peer["peer"],
                    "echo_ok": True,
                    "handshake": True,
                    "endpoint": [lab.nodes[j].ip, 51820],
                    "rx_grew": True,
                    "tx_grew": True,
                    "underlay_refused": True,
                }, f"node {i} -> node {j}"

        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            proc.stdin.flush()
        for reader in readers:
            reader.wait_for("down", 20)
        _reap(procs)
        assert [p.returncode for p in procs] == [0, 0, 0]
        for i in range(3):  # down() removed the interface
            shown = labmod.lab_exec(lab, i, ["ip", "link", "show", "gfl0"], False)
            assert shown.returncode != 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        _reap(procs)


def _snapshot() -> dict[str, object]:
    run_wg = Path("/run/wireguard")
    return {
        "netns": subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout,
        "links": subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout,
        "run_wireguard": sorted(os.listdir(run_wg)) if run_wg.exists() else None,
    }


def _pids() -> set[int]:
    """Every user-space process (kernel threads come and go on their own)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except FileNotFoundError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid != 2 and entry != "2":
            pids.add(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return "(gone)"


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_lab_down_from_another_process_leaves_nothing_behind(tmp_path: Path) -> None:
    before = _snapshot()
    pids_before = _pids()
    root = tmp_path / "lab"
    lab = labmod.lab_up(3, root, name="leak")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(labmod.lab_spawn(lab, 0, ["wireguard-go", "-f", "gfl0"]))
        procs.append(labmod.lab_spawn(lab, 1, ["sleep", "600"]))
        # A grandchild the lab never recorded: found through `ip netns pids`.
        procs.append(labmod.lab_spawn(lab, 2, ["sh", "-c", "sleep 600 & wait"]))
        _wait_until(
            lambda: (
                labmod.lab_exec(
                    lab, 0, ["ip", "link", "show", "gfl0"], False
                ).returncode
                == 0
            ),
            10,
        )
        # The UAPI socket is in node 0's private tmpfs, not on the host.
        assert not Path("/run/wireguard/gfl0.sock").exists()
        status = labmod.lab_status(root)
        assert [n.link_up for n in status.nodes] == [True, True, True]
        assert all(p.alive for p in status.processes)
        spawned = _pids() - pids_before

        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, pathlib, gossipfl.lab as L;"
                " L.lab_down(pathlib.Path(sys.argv[1]))",
                str(root),
            ],
            env=ENV,
            check=True,
            timeout=60,
        )
        _reap(procs, 10)
    finally:
        if (root / labmod.STATE_FILE).exists():
            labmod.lab_down(root)

    assert _snapshot() == before
    assert not root.exists()
    # An orphaned grandchild is reaped by init a moment after it dies.
    deadline = time.monotonic() + 10
    while (survivors := spawned & _pids()) and time.monotonic() < deadline:
        time.sleep(0.02)
    named = {pid: _cmdline(pid) for pid in survivors}
    assert not named, f"lab processes survived lab_down: {named}"


LISTEN = "import socket, time; s = socket.create_server(('', 7100)); time.sleep(600)"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 7100), 1.0)"


def test_link_cut_and_heal(make_lab: Callable[[int], labmod.Lab]) -> None:
    lab = make_lab(2)
    listener = labmod.lab_spawn(lab, 1, [sys.executable, "-c", LISTEN])
    probe = [sys.executable, "-c", CONNECT, lab.nodes[1].ip]

    def reachable() -> bool:
        return labmod.lab_exec(lab, 0, probe, False).returncode == 0

    try:
        _wait_until(reachable, 10)
        labmod.set_link(lab, 1, up=False)
        assert not reachable()
        assert not labmod.lab_status(Path(lab.root)).nodes[1].link_up
        labmod.set_link(lab, 1, up=True)
        _wait_until(reachable, 10)
    finally:
        listener.kill()
        listener.wait()


def test_choose_backend_probe_leaves_no_link(
    make_lab: Callable[[int], labmod.Lab],
) -> None:
    lab = make_lab(1)
    probe = (
        "import asyncio; from gossipfl.mesh import choose_backend;"
        " print(asyncio.run(choose_backend()).kind)"
    )
    before = labmod.lab_exec(lab, 0, ["ip", "-o", "link", "show"]).stdout
    kernel = labmod.lab_exec(
        lab, 0, ["ip", "link", "add", "gflk0", "type", "wireguard"], False
    )
    if kernel.returncode == 0:
        labmod.lab_exec(lab, 0, ["ip", "link", "del", "gflk0"])

    chosen = subprocess.run(
        ["ip", "netns", "exec", lab.nodes[0].netns, sys.executable, "-c", probe],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )

    assert chosen.stdout.strip() == (
        "kernel" if kernel.returncode == 0 else "userspace"
    )
    assert labmod.lab_exec(lab, 0, ["ip", "-o", "link", "show"]).stdout == before
