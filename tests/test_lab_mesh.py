"""``gossipfl up`` end to end: real daemons in a netns lab, watched from outside.

One lab serves most checks (the module fixture ``mesh_lab``): five namespaces on one
bridge, nodes 0-3 members of one mesh and node 4 a *stranger*, a node with a good key
whose certificate another mesh key signed. Every node runs ``gossipfl up`` through
``gossipfl.labrun`` as a box would. The tests run in file order, each on what the one
before left running:

1. members find each other by mDNS, shake hands over WireGuard, learn the digits
   together; the tunnel's counters cover the gossip bytes; the gossip port answers
   on the mesh address only;
2. the stranger stays out, at mDNS, at WireGuard and at the gossip port;
3. a member killed with SIGKILL restarts clean (its wireguard-go and interface
   removed), resumes from its checkpoint and rejoins;
4. a member's underlay cut and healed recovers without a restart;
5. ``lab down`` leaves namespaces, links, processes and /run/wireguard as they were.

A duplicate identity runs in a small lab of its own (node 2 holds a copy of node 0's
key), since its nodes disturb the mesh on purpose.

Gossip never stops (``max_rounds`` 0) so that the later checks see exchanges, and
rounds are paced by ``round_interval_s`` to leave CPU for daemons that (re)start:
accuracy is judged once every member has run ``ACCURACY_ROUNDS`` rounds. Every wait
is a poll of the control sockets with a deadline; the only timing assertion is the
15 s discovery bound. A failing test gets each daemon's status and log tail in its
report (``describe_failure``, picked up by ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from gossipfl import lab as labmod
from gossipfl import labrun
from gossipfl import mesh as meshmod
from gossipfl.checkpoint import CHECKPOINT_FILE
from gossipfl.control import NotRunning, fetch_status
from gossipfl.identity import load_identity
from gossipfl.membership import WRONG_MESH
from gossipfl.up import STATE_FILE as UP_STATE_FILE
from gossipfl.up import STATS_INTERVAL_S

pytestmark = [pytest.mark.netns, pytest.mark.slow]

T = TypeVar("T")

MEMBERS = [0, 1, 2, 3]
STRANGER = 4
GOSSIP = {"max_rounds": 0, "round_interval_s": 0.05, "checkpoint_interval_s": 1.0}
STRANGER_GOSSIP = {"max_rounds": 1}  # it has nobody to gossip with anyway

DISCOVERY_BOUND_S = 15.0  # the bound, from a daemon's start
ACCURACY_ROUNDS = 300
TARGET_ACCURACY = 0.92

POLL_S = 0.25
START_TIMEOUT_S = 90.0  # torch imports of five daemons on two cores
HANDSHAKE_TIMEOUT_S = 30.0
ACCURACY_TIMEOUT_S = 120.0
REJOIN_TIMEOUT_S = 90.0
CUT_TIMEOUT_S = 40.0
# A healed peer is retried when its back-off ends (peers.BACKOFF_MAX_S, 30 s) and
# an exchange then takes at most exchange_timeout_s (10 s).
HEAL_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 3.0
REAP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 30

PROBE = """\
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((host, port), timeout).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as exc:
    unreachable = exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
    print("unreachable" if unreachable else f"errno {exc.errno}")
"""

# Run inside a daemon's mount namespace, where its wireguard-go UAPI socket is.
WG_PEERS = """\
import asyncio, json, sys
from gossipfl import mesh
sock = mesh.UAPI_SOCKET_DIR / (sys.argv[1] + ".sock")
peers = mesh.parse_uapi_get(asyncio.run(mesh.uapi_request(sock, "get=1\\n\\n")))
print(json.dumps([[p.public_key.hex(), p.last_handshake_s, p.rx_bytes, p.tx_bytes]
                  for p in peers]))
"""

# The stranger does what discovery would never do for it: it adds a member as a
# WireGuard peer with a route to the member's mesh address, and connects.
FORCE_PEER = """\
import asyncio, json, socket, subprocess, sys
from gossipfl import mesh
ifname, key_hex, ip, wg_port, address, port, timeout = sys.argv[1:]
sock = mesh.UAPI_SOCKET_DIR / (ifname + ".sock")
key = bytes.fromhex(key_hex)
route = ["ip", "-6", "route", "replace", address + "/128", "dev", ifname]
asyncio.run(mesh.uapi_request(sock, mesh.uapi_set_peer(
    key, (ip, int(wg_port)), [address + "/128"], 0)))
subprocess.run(route, check=True)
try:
    socket.create_connection((address, int(port)), float(timeout)).close()
    outcome = "open"
except TimeoutError:
    outcome = "timeout"
except OSError as exc:
    outcome = f"errno {exc.errno}"
peers = mesh.parse_uapi_get(asyncio.run(mesh.uapi_request(sock, "get=1\\n\\n")))
forced = [p for p in peers if p.public_key == key][0]
asyncio.run(mesh.uapi_request(sock, mesh.uapi_remove_peer(key)))
subprocess.run(["ip", "-6", "route", "del", address + "/128", "dev", ifname])
print(json.dumps({"outcome": outcome, "handshake": forced.last_handshake_s,
                  "rx": forced.rx_bytes, "tx": forced.tx_bytes}))
"""


# --- observing the lab from outside ---------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, from the state on."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _identity(pid: int) -> tuple[int, str] | None:
    """``pid`` with its start time, so that a reused pid is told apart."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else (pid, fields[19])


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _net_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _user_pids() -> set[int]:
    """Every process but kernel threads."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != "2":
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if stat[stat.rindex(")") + 2:].split()[1] != "2":
                pids.add(int(entry))
    return pids


def _host_snapshot() -> dict[str, Any]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    run_wg = labmod.RUN_WIREGUARD
    return {
        "netns": sorted(run("ip", "netns", "list").split()),
        "links": run("ip", "-o", "link", "show"),
        "run_wireguard": sorted(os.listdir(run_wg)) if run_wg.exists() else None,
    }


def _peer(status: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((p for p in status["peers"] if p["id"] == key), None)


def _failures(status: dict[str, Any], key: str) -> int:
    peer = _peer(status, key)
    return peer["failures"] if peer else 0


class LabNodes:
    """The ``gossipfl up`` daemons of one lab: processes, control sockets, logs."""

    def __init__(self, root: Path, lab: labmod.Lab) -> None:
        self.root = root
        self.lab = lab
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.old_procs: list[subprocess.Popen[bytes]] = []
        self.spawned_at: dict[int, float] = {}
        self.ids: dict[int, str] = {}
        self.last: dict[int, dict[str, Any]] = {}
        self.ever_peers: dict[int, set[str]] = {}
        self.ever_mesh_peers: dict[int, set[str]] = {}
        self.saved_tails: dict[int, str] | None = None
        self.is_down = False

    # --- processes ----------------------------------------------------------------

    def start(self, i: int) -> None:
        if i in self.procs:
            self.old_procs.append(self.procs[i])
        self.ids[i] = load_identity(self.state_dir(i)).public_key.hex()
        with open(self.state_dir(i) / labrun.LOG_FILE, "ab") as log:
            log.write(f"--- test starts node{i} ---\n".encode())
        self.spawned_at[i] = time.time()
        self.procs[i] = labrun.start_node(self.lab, i)

    def down(self) -> None:
        """``lab_down_all``, keeping the log tails for a failure report."""
        if self.is_down:
            return
        self.saved_tails = {i: self.log_tail(i) for i in self.procs}
        self.is_down = True
        labrun.lab_down_all(self.root)
        self.reap()

    def reap(self) -> None:
        for proc in [*self.procs.values(), *self.old_procs]:
            try:
                proc.wait(REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- paths --------------------------------------------------------------------

    def state_dir(self, i: int) -> Path:
        return Path(self.lab.node(i).state_dir)

    def ip(self, i: int) -> str:
        return self.lab.node(i).ip

    # --- status -------------------------------------------------------------------

    def poll(self, indices: list[int]) -> dict[int, dict[str, Any] | None]:
        """One status per node (None while its socket does not answer), fetched
        together; a daemon that exited fails the test at once."""
        for i in indices:
            code = self.procs[i].poll()
            if code is not None:
                raise AssertionError(f"node {i}'s gossipfl up exited with {code}")

        async def one(i: int) -> dict[str, Any] | None:
            try:
                return await fetch_status(labrun.control_socket(self.lab, i), 5.0)
            except NotRunning:
                return None

        async def every() -> list[dict[str, Any] | None]:
            return await asyncio.gather(*(one(i) for i in indices))

        found = dict(zip(indices, asyncio.run(every()), strict=True))
        for i, status in found.items():
            if status is not None:
                self.last[i] = status
                self.ever_peers.setdefault(i, set()).update(
                    p["id"] for p in status["peers"])
                self.ever_mesh_peers.setdefault(i, set()).update(
                    status.get("mesh", {}).get("peers", {}))
        return found

    def wait_for(self, what: str, indices: list[int], timeout_s: float,
                 check: Callable[[dict[int, dict[str, Any]]], T | None]) -> T:
        """Poll until ``check`` (given every node's status) returns a true value."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.poll(indices)
            answered = {i: s for i, s in found.items() if s is not None}
            if len(answered) == len(found):
                result = check(answered)
                if result:
                    return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:g} s\n"
                                     f"{self.summary(indices)}")
            time.sleep(POLL_S)

    def snapshot(self, indices: list[int]) -> dict[int, dict[str, Any]]:
        """Every node's status, once all of them answer."""
        return self.wait_for("statuses", indices, START_TIMEOUT_S, lambda st: st)

    def exchanges_with(self, status: dict[str, Any], j: int) -> int:
        peer = _peer(status, self.ids[j])
        return peer["exchanges"] if peer else 0

    # --- inside the namespaces ------------------------------------------------------

    def probe(self, i: int, host: str, port: int,
              timeout_s: float = CONNECT_TIMEOUT_S) -> str:
        """A TCP connect from node ``i``'s namespace: open, refused, timeout, ..."""
        argv = [sys.executable, "-c", PROBE, host, str(port), str(timeout_s)]
        return labmod.lab_exec(self.lab, i, argv).stdout.strip()

    def in_daemon(self, i: int, script: str, *args: str) -> Any:
        """Run a Python ``script`` in node ``i``'s network and mount namespaces
        (those of its daemon, where its /run/wireguard is); its JSON output."""
        argv = ["nsenter", "-t", str(self.procs[i].pid), "-m", "-n",
                sys.executable, "-c", script, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{script[:40]!r} in node {i}: {done.stderr}"
        return json.loads(done.stdout)

    def netns_pids(self, i: int) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.lab.node(i).netns],
                                capture_output=True, text=True, check=True)
        return [int(p) for p in listed.stdout.split() if _running(int(p))]

    # --- reporting ----------------------------------------------------------------

    def log(self, i: int) -> str:
        try:
            return (self.state_dir(i) / labrun.LOG_FILE).read_text()
        except FileNotFoundError:
            return "(no log)"

    def log_tail(self, i: int) -> str:
        return "\n".join(self.log(i).splitlines()[-LOG_TAIL_LINES:])

    def summary(self, indices: list[int] | None = None) -> str:
        out = []
        for i in indices if indices is not None else sorted(self.procs):
            s = self.last.get(i)
            if s is None:
                out.append(f"node {i}: never answered")
                continue
            peers = ", ".join(f"{p['short_id']} {p['state']} n={p['exchanges']} "
                              f"fail={p['failures']}" for p in s["peers"])
            out.append(f"node {i}: {s['state']} round {s['round']} accuracy "
                       f"{s['accuracy']} problems {s['problems']} duplicate "
                       f"{s['duplicate_identity']} strangers "
                       f"{[x['id'][:8] for x in s['strangers']]} peers [{peers}]")
        return "\n".join(out)

    def describe_failure(self) -> str:
        tails = self.saved_tails or {i: self.log_tail(i) for i in self.procs}
        parts = [self.summary()]
        for i, tail in sorted(tails.items()):
            parts.append(f"--- node{i}/{labrun.LOG_FILE} (last {LOG_TAIL_LINES} "
                         f"lines) ---\n{tail}")
        return "\n".join(parts)


def _new_lab(root: Path, nodes: int) -> LabNodes:
    """Namespaces for ``nodes`` nodes under ``root``; ``lab_up`` undoes itself on
    failure, and the caller takes the lab down."""
    return LabNodes(root, labmod.lab_up(nodes, root, name="m" + secrets.token_hex(3)))


# --- the shared lab -------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_before() -> dict[str, Any]:
    """The host as it was before the shared lab came up."""
    return {**_host_snapshot(), "pids": _user_pids()}


@pytest.fixture(scope="module")
def mesh_lab(host_before: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabNodes]:
    root = tmp_path_factory.mktemp("labmesh") / "lab"
    nodes = _new_lab(root, len(MEMBERS) + 1)
    try:
        labrun.make_mesh_key(labrun.mesh_dir(nodes.lab))
        other = root / "mesh-other"
        labrun.make_mesh_key(other)
        for i in MEMBERS:
            labrun.prepare_node(nodes.lab, i, len(MEMBERS), gossip=GOSSIP)
        labrun.prepare_node(nodes.lab, STRANGER, len(MEMBERS),
                            gossip=STRANGER_GOSSIP, mesh_keys=other)
        for i in [*MEMBERS, STRANGER]:
            nodes.start(i)
        yield nodes
    finally:
        if (root / labmod.STATE_FILE).exists():
            nodes.down()
        nodes.reap()


def test_members_discover_handshake_learn_and_gossip_only_inside_the_tunnel(
    mesh_lab: LabNodes,
) -> None:
    nodes = mesh_lab
    everyone = [*MEMBERS, STRANGER]

    # Discovery: each member lists the other three, found by mDNS.
    found_at: dict[int, float] = {}
    started_at: dict[int, float] = {}

    def found_all(st: dict[int, dict[str, Any]]) -> bool:
        now = time.time()
        for i in MEMBERS:
            if i in found_at:
                continue
            by_mdns = {p["id"] for p in st[i]["peers"] if "mdns" in p["sources"]}
            if by_mdns >= {nodes.ids[j] for j in MEMBERS if j != i}:
                found_at[i] = now
                started_at[i] = now - st[i]["uptime_s"]
        return len(found_at) == len(MEMBERS)

    nodes.wait_for("members find each other by mDNS", everyone, START_TIMEOUT_S,
                   found_all)
    took = {i: found_at[i] - started_at[i] for i in MEMBERS}
    print("discovery s after daemon start:", {i: round(t, 2) for i, t in took.items()},
          "after spawn:", {i: round(found_at[i] - nodes.spawned_at[i], 2)
                           for i in MEMBERS})
    slow = {i: t for i, t in took.items() if t > DISCOVERY_BOUND_S}
    assert not slow, f"discovery slower than {DISCOVERY_BOUND_S} s: {slow}"

    # WireGuard: a completed handshake with every peer.
    def handshakes(st: dict[int, dict[str, Any]]) -> bool:
        return all(len(st[i]["peers"]) == len(MEMBERS) - 1 and all(
            p["mesh"]["latest_handshake"] for p in st[i]["peers"]) for i in MEMBERS)

    nodes.wait_for("a WireGuard handshake with every peer", MEMBERS,
                   HANDSHAKE_TIMEOUT_S, handshakes)

    # Learning: mean held-out accuracy once every member ran ACCURACY_ROUNDS.
    reached = nodes.wait_for(
        f"every member at round {ACCURACY_ROUNDS}", MEMBERS, ACCURACY_TIMEOUT_S,
        lambda st: st if all(st[i]["round"] >= ACCURACY_ROUNDS for i in MEMBERS)
        else None)
    accuracy = [reached[i]["accuracy"] for i in MEMBERS]
    mean = float(np.mean(accuracy))
    print(f"accuracy at rounds {[reached[i]['round'] for i in MEMBERS]}: "
          f"{[round(a, 4) for a in accuracy]}, mean {mean:.4f}")
    assert mean >= TARGET_ACCURACY, f"mean accuracy {mean:.4f} < {TARGET_ACCURACY}"

    # Counters: WireGuard's, read after the gossip ones, cover the gossip bytes.
    # They are read every STATS_INTERVAL_S and only grow, so within a few reads
    # they must be at least the gossip counters of this earlier snapshot.
    before = nodes.snapshot(MEMBERS)
    for i in MEMBERS:
        for p in before[i]["peers"]:
            assert p["bytes_in"] > 0 and p["bytes_out"] > 0, f"node {i}: {p}"

    def covered(st: dict[int, dict[str, Any]]) -> list[str] | None:
        rows = []
        for i in MEMBERS:
            for old in before[i]["peers"]:
                now = _peer(st[i], old["id"])
                if now is None:
                    return None
                wg = now["mesh"]
                if wg["wg_rx_bytes"] < old["bytes_in"] or \
                        wg["wg_tx_bytes"] < old["bytes_out"]:
                    return None
                rows.append(f"{i}->{old['short_id']} in {old['bytes_in']} <= rx "
                            f"{wg['wg_rx_bytes']}, out {old['bytes_out']} <= tx "
                            f"{wg['wg_tx_bytes']}")
        return rows

    rows = nodes.wait_for("WireGuard counters cover the gossip bytes", MEMBERS,
                          4 * STATS_INTERVAL_S, covered)
    print("\n".join(rows))

    # The gossip port: open on the mesh address, refused on the underlay.
    for i in MEMBERS:
        j = MEMBERS[(MEMBERS.index(i) + 1) % len(MEMBERS)]
        m = nodes.last[i]["mesh"]
        port = m["gossip_port"]
        assert nodes.probe(j, nodes.ip(i), port) == "refused", \
            f"node {i}'s gossip port answers on its underlay {nodes.ip(i)}"
        assert nodes.probe(j, m["address"], port) == "open", \
            f"node {i}'s gossip port is closed on its mesh address {m['address']}"


def test_a_stranger_advertises_but_never_gets_in(mesh_lab: LabNodes) -> None:
    nodes = mesh_lab
    stranger = nodes.ids[STRANGER]
    everyone = [*MEMBERS, STRANGER]

    # Members list it as a stranger (from another mesh), and it them.
    def listed(st: dict[int, dict[str, Any]]) -> bool:
        members_see = all(any(x["id"] == stranger and x["reason"] == WRONG_MESH
                              for x in st[i]["strangers"]) for i in MEMBERS)
        it_sees = {x["id"] for x in st[STRANGER]["strangers"]}
        return members_see and it_sees >= {nodes.ids[i] for i in MEMBERS}

    nodes.wait_for("everyone lists the stranger as a stranger", everyone,
                   START_TIMEOUT_S, listed)

    # Never a peer: not in any status seen so far, nor in the interfaces.
    for i in MEMBERS:
        assert stranger not in nodes.ever_peers[i], f"node {i} took the stranger"
        assert stranger not in nodes.ever_mesh_peers[i], f"node {i} meshed with it"
    assert not nodes.ever_peers[STRANGER], "the stranger got peers"
    member_wg = {i: meshmod.wg_public_key(bytes.fromhex(nodes.ids[i])).hex()
                 for i in MEMBERS}
    ifname = nodes.last[0]["mesh"]["interface"]
    for i in MEMBERS:
        keys = {row[0] for row in nodes.in_daemon(i, WG_PEERS, ifname)}
        assert keys == {member_wg[j] for j in MEMBERS if j != i}, f"node {i}: {keys}"

    # Its attempts: no route to our mesh, refused on the underlay, and a WireGuard
    # peer it forces onto its own interface gets no handshake back.
    for i in MEMBERS:
        m = nodes.last[i]["mesh"]
        assert nodes.probe(STRANGER, m["address"], m["gossip_port"]) == \
            "unreachable"
        assert nodes.probe(STRANGER, nodes.ip(i), m["gossip_port"]) == "refused"
    m0 = nodes.last[0]["mesh"]
    forced = nodes.in_daemon(
        STRANGER, FORCE_PEER, ifname, member_wg[0], nodes.ip(0),
        str(m0["listen_port"]), m0["address"], str(m0["gossip_port"]),
        str(CONNECT_TIMEOUT_S))
    print("stranger forcing node 0 as a WireGuard peer:", forced)
    assert forced["outcome"] == "timeout", forced
    assert forced["tx"] > 0, f"the stranger sent no handshake at all: {forced}"
    assert forced["handshake"] is None and forced["rx"] == 0, forced
    after = nodes.snapshot(MEMBERS)
    for i in MEMBERS:
        assert stranger not in after[i]["mesh"]["peers"], f"node {i} meshed with it"


def _checkpoint_round(path: Path) -> int:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes())
    return int(meta["round"])


def _ifindex(nodes: LabNodes, i: int, ifname: str) -> int | None:
    shown = labmod.lab_exec(nodes.lab, i, ["ip", "-j", "link", "show", ifname], False)
    return int(json.loads(shown.stdout)[0]["ifindex"]) if shown.returncode == 0 \
        else None


def test_a_sigkilled_member_restarts_clean_resumes_and_rejoins(
    mesh_lab: LabNodes,
) -> None:
    nodes = mesh_lab
    k = MEMBERS[-1]
    others = [i for i in MEMBERS if i != k]
    ifname = nodes.last[k]["mesh"]["interface"]
    pre = nodes.snapshot(MEMBERS)
    exchanged = {j: nodes.exchanges_with(pre[j], k) for j in others}
    victim = nodes.procs[k]
    assert "gossipfl up" in _cmdline(victim.pid), _cmdline(victim.pid)
    state = json.loads((nodes.state_dir(k) / UP_STATE_FILE).read_text())
    old_wg, old_ifindex = int(state["wg_pid"]), _ifindex(nodes, k, ifname)

    # SIGKILL: no shutdown at all. Its wireguard-go and interface stay behind,
    # and the dead daemon stays a zombie until its parent (this test) reaps it.
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while _running(victim.pid):
        assert time.monotonic() < deadline, "SIGKILL did not kill the daemon"
        time.sleep(0.02)
    assert _running(old_wg), "wireguard-go died with its parent; nothing to clean"
    assert _ifindex(nodes, k, ifname) == old_ifindex
    saved_round = _checkpoint_round(nodes.state_dir(k) / CHECKPOINT_FILE)
    assert saved_round > 0

    # Restart: the leftovers are removed and the checkpoint restored.
    nodes.start(k)
    first = nodes.wait_for("the restarted node answers", [k], START_TIMEOUT_S,
                           lambda st: st[k])
    print(f"checkpoint round {saved_round}, first round after restart "
          f"{first['round']}")
    assert first["round"] > 0 and first["round"] >= saved_round
    assert not _running(old_wg), f"the old wireguard-go {old_wg} still runs"
    assert _ifindex(nodes, k, ifname) not in (None, old_ifindex)
    wireguard = [p for p in nodes.netns_pids(k)
                 if _cmdline(p).startswith("wireguard-go")]
    assert len(wireguard) == 1 and wireguard[0] != old_wg, wireguard
    assert victim.wait(REAP_TIMEOUT_S) == -signal.SIGKILL

    # Rejoin: exchanges resume on every edge and its accuracy is back up.
    def rejoined(st: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]] | None:
        theirs = all(nodes.exchanges_with(st[j], k) > exchanged[j] for j in others)
        mine = all(nodes.exchanges_with(st[k], j) > 0 for j in others)
        back = theirs and mine and st[k]["accuracy"] >= TARGET_ACCURACY
        return st if back else None

    began = time.monotonic()
    back = nodes.wait_for("the restarted node rejoins", MEMBERS, REJOIN_TIMEOUT_S,
                          rejoined)
    print(f"rejoined {time.monotonic() - began:.1f} s after answering, round "
          f"{back[k]['round']}, accuracy {back[k]['accuracy']:.4f}, mean "
          f"{np.mean([back[i]['accuracy'] for i in MEMBERS]):.4f}")
    # Its own advertisement of the killed run comes from its own address: stale,
    # not a duplicate identity.
    assert all(not back[i]["duplicate_identity"] for i in MEMBERS), \
        {i: back[i]["duplicate_identity"] for i in MEMBERS}


def test_a_cut_underlay_heals_without_a_restart(mesh_lab: LabNodes) -> None:
    nodes = mesh_lab
    c = MEMBERS[1]
    others = [i for i in MEMBERS if i != c]
    pid = nodes.procs[c].pid

    # Cut: every other member fails to reach it, and it them.
    labmod.set_link(nodes.lab, c, False)
    try:
        def failing(st: dict[int, dict[str, Any]]) -> bool:
            theirs = all(_failures(st[j], nodes.ids[c]) > 0 for j in others)
            mine = all(p["failures"] > 0 for p in st[c]["peers"])
            return theirs and mine

        nodes.wait_for("the cut node's exchanges fail", MEMBERS, CUT_TIMEOUT_S,
                       failing)
    finally:
        labmod.set_link(nodes.lab, c, True)

    # Heal: exchanges on every edge of the cut node resume, same process.
    healed_at = time.monotonic()
    at_heal = nodes.snapshot(MEMBERS)
    theirs = {j: nodes.exchanges_with(at_heal[j], c) for j in others}
    mine = {j: nodes.exchanges_with(at_heal[c], j) for j in others}

    def resumed(st: dict[int, dict[str, Any]]) -> bool:
        return all(nodes.exchanges_with(st[j], c) > theirs[j] and
                   nodes.exchanges_with(st[c], j) > mine[j] for j in others)

    nodes.wait_for("exchanges with the healed node resume", MEMBERS,
                   HEAL_TIMEOUT_S, resumed)
    print(f"exchanges resumed {time.monotonic() - healed_at:.1f} s after the heal")
    assert nodes.procs[c].poll() is None and nodes.last[c]["node"]["pid"] == pid


def test_lab_down_leaves_the_host_as_it_was(
    mesh_lab: LabNodes, host_before: dict[str, Any],
) -> None:
    nodes = mesh_lab
    namespaces = [nodes.lab.hub, *(n.netns for n in nodes.lab.nodes)]
    ns_ids = {os.stat(f"/run/netns/{ns}").st_ino for ns in namespaces}
    pids = {p for i in range(len(nodes.lab.nodes)) for p in nodes.netns_pids(i)}
    pids |= {p.pid for p in nodes.procs.values()}
    ours = {who for pid in pids if (who := _identity(pid)) is not None}
    root = str(nodes.root)
    crashed = [i for i in nodes.procs if "Traceback" in nodes.log(i)]
    assert not crashed, f"nodes {crashed} logged a traceback"

    nodes.down()

    # Every daemon stopped on SIGTERM by itself (exit 0), none had to be killed.
    codes = {i: proc.returncode for i, proc in nodes.procs.items()}
    assert codes == dict.fromkeys(nodes.procs, 0), codes
    assert _host_snapshot() == {k: v for k, v in host_before.items() if k != "pids"}

    def leftovers() -> dict[int, str]:
        found = {}
        for pid in _user_pids() - host_before["pids"]:
            if not _running(pid):
                continue
            cmd = _cmdline(pid)
            if _identity(pid) in ours or root in cmd or _net_ns(pid) in ns_ids:
                found[pid] = cmd
        return found

    # Orphans (the wireguard-go of the SIGKILLed run) are reaped by init.
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not left, f"processes of the lab survived lab down: {left}"
    assert not Path(root).exists()


# --- a duplicate identity -------------------------------------------------------------


@pytest.fixture
def duplicate_lab(tmp_path: Path) -> Iterator[LabNodes]:
    root = tmp_path / "lab"
    nodes = _new_lab(root, 3)
    try:
        labrun.make_mesh_key(labrun.mesh_dir(nodes.lab))
        gossip = {"max_rounds": 0, "round_interval_s": 0.1}
        labrun.prepare_node(nodes.lab, 0, 2, gossip=gossip)
        labrun.prepare_node(nodes.lab, 1, 2, gossip=gossip)
        copy = load_identity(nodes.state_dir(0))
        labrun.prepare_node(nodes.lab, 2, 2, gossip=gossip, identity=copy)
        for i in range(3):
            nodes.start(i)
        yield nodes
    finally:
        if (root / labmod.STATE_FILE).exists():
            nodes.down()
        nodes.reap()


def test_a_copied_identity_is_reported_by_both_boxes(
    duplicate_lab: LabNodes,
) -> None:
    nodes = duplicate_lab
    assert nodes.ids[0] == nodes.ids[2]
    problem = "another node uses this node's identity"

    def reported(st: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]] | None:
        both = nodes.ip(2) in st[0]["duplicate_identity"] and \
            nodes.ip(0) in st[2]["duplicate_identity"]
        return st if both else None

    st = nodes.wait_for("both copies report the duplicate", [0, 1, 2],
                        START_TIMEOUT_S, reported)
    for i in (0, 2):
        assert st[i]["healthy"] is False and problem in st[i]["problems"], st[i]
    assert not st[1]["duplicate_identity"] and problem not in st[1]["problems"]

    for i in (0, 2):
        shown = subprocess.run(
            [sys.executable, "-m", "gossipfl", "status", "--socket",
             str(labrun.control_socket(nodes.lab, i))],
            capture_output=True, text=True, timeout=60)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        other = nodes.ip(2 - i)
        assert f"DUPLICATE IDENTITY: a node at {other}" in shown.stdout, shown.stdout
