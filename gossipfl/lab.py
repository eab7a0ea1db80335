"""A lab of N nodes in network namespaces on one bridge, for tests and demos.

Layout::

    netns gfl-<lab>-hub     bridge br0, ports p0..p<N-1>          (no addresses)
    netns gfl-<lab>-<i>     ul0 = 198.51.100.<10+i>/24, peer of p<i>; lo up
    <root>/lab.json         everything made, so ``lab_down`` works from any process
    <root>/node<i>/         node i's state directory

The bridge lives in its own namespace rather than the host's, so a crashed test
leaves no interface on the host, only namespaces that ``lab_down`` (or ``ip netns
del``) removes. Multicast (mDNS) crosses the bridge; nothing routes off it.

Commands for node i run inside its network namespace *and* a mount namespace of
their own with a private tmpfs on ``/run/wireguard``: wireguard-go puts its UAPI
socket there under the interface name, and ``/run`` is shared by every network
namespace, so without this two nodes with an interface of the same name would
collide. ``/run/wireguard`` is made on the host as a mount point when missing and
removed again by ``lab_down``.

Processes started with ``lab_spawn`` are recorded with their kernel start time (so a
reused pid is never signalled); ``lab_down`` also ends every process still inside a
lab namespace (``ip netns pids``), SIGTERM first, SIGKILL after ``stop_timeout_s``.

These functions block (subprocess.run). They are for the CLI (``gossipfl lab
up/status/down``) and test fixtures, never for the daemon's event loop. Root only.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, MeshError, StateError
from .procs import running, start_time

logger = logging.getLogger(__name__)

STATE_FILE = "lab.json"
UNDERLAY_NET = ipaddress.IPv4Network("198.51.100.0/24")  # RFC 5737 TEST-NET-2
HOST_OFFSET = 10
MAX_NODES = 240
NODE_IFNAME = "ul0"
BRIDGE = "br0"
RUN_WIREGUARD = Path("/run/wireguard")
_NAME_RE = re.compile(r"[a-z0-9]{1,12}")
_PRIVATE_MOUNT = 'mount -t tmpfs -o mode=0700 tmpfs /run/wireguard && exec "$@"'


@dataclass
class LabNode:
    index: int
    netns: str
    address: str  # with prefix length, e.g. 198.51.100.10/24
    state_dir: str
    hub_port: str

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass
class LabProcess:
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat, clock ticks since boot
    node: int
    argv: list[str]


@dataclass
class Lab:
    name: str
    root: str
    hub: str
    nodes: list[LabNode] = field(default_factory=list)
    processes: list[LabProcess] = field(default_factory=list)
    netns_made: list[str] = field(default_factory=list)
    created_root: bool = False
    created_run_wireguard: bool = False

    def node(self, index: int) -> LabNode:
        if not 0 <= index < len(self.nodes):
            raise ConfigError(f"node {index} not in 0..{len(self.nodes) - 1}")
        return self.nodes[index]


def netns_name(lab: str, index: int) -> str:
    return f"gfl-{lab}-{index}"


def node_address(index: int) -> str:
    ip = UNDERLAY_NET.network_address + HOST_OFFSET + index
    return f"{ip}/{UNDERLAY_NET.prefixlen}"


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise MeshError(
            f"{' '.join(argv)} failed with exit {proc.returncode}: "
            f"{proc.stderr.strip()}"
        )
    return proc


# The state file.


def _state_path(root: Path) -> Path:
    return root / STATE_FILE


def _save(lab: Lab) -> None:
    path = _state_path(Path(lab.root))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(lab), indent=1))
    tmp.replace(path)


def load_lab(root: Path) -> Lab:
    """The lab recorded under ``root``; StateError if there is none."""
    path = _state_path(root)
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"no lab at {root} (no {STATE_FILE})") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"{path} is corrupt: {exc}") from None
    try:
        lab = Lab(**raw)
        lab.nodes = [LabNode(**n) for n in raw["nodes"]]
        lab.processes = [LabProcess(**p) for p in raw["processes"]]
    except (TypeError, KeyError) as exc:
        raise StateError(f"{path} does not describe a lab: {exc}") from None
    return lab


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise state-file updates between processes spawning into one lab."""
    with open(root / ".lab.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# Up.


def lab_up(n: int, root: Path, name: str = "lab") -> Lab:
    """Make ``n`` namespaces on one bridge, with state dirs under ``root``.

    On failure, whatever was made is removed again before the error propagates.
    """
    if os.geteuid() != 0:
        raise ConfigError("the lab needs root (network namespaces)")
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"lab name {name!r} must be 1..12 of [a-z0-9]")
    if not 1 <= n <= MAX_NODES:
        raise ConfigError(f"{n} nodes not in 1..{MAX_NODES}")
    if _state_path(root).exists():
        raise StateError(f"a lab is already up in {root}; run 'gossipfl lab down'")
    taken = set(_run(["ip", "netns", "list"]).stdout.split())
    wanted = [f"gfl-{name}-hub"] + [netns_name(name, i) for i in range(n)]
    if clash := taken.intersection(wanted):
        raise StateError(f"namespaces {sorted(clash)} exist; another lab {name!r}?")

    lab = Lab(name=name, root=str(root), hub=f"gfl-{name}-hub")
    lab.created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lab.created_run_wireguard = not RUN_WIREGUARD.exists()
    if lab.created_run_wireguard:
        RUN_WIREGUARD.mkdir(mode=0o755)
    _save(lab)
    try:
        _make(lab, n)
    except (MeshError, OSError):
        lab_down(root)
        raise
    logger.info("lab %s up: %d nodes under %s", name, n, root)
    return lab


def _make(lab: Lab, n: int) -> None:
    def netns_add(ns: str) -> None:
        lab.netns_made.append(ns)
        _save(lab)  # recorded first: a half-made namespace is still removed
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    netns_add(lab.hub)
    hub = ["ip", "-n", lab.hub]
    _run([*hub, "link", "add", BRIDGE, "type", "bridge"])
    _run([*hub, "link", "set", BRIDGE, "up"])
    for i in range(n):
        ns = netns_name(lab.name, i)
        state_dir = Path(lab.root) / f"node{i}"
        node = LabNode(i, ns, node_address(i), str(state_dir), f"p{i}")
        netns_add(ns)
        state_dir.mkdir(mode=0o700, exist_ok=True)
        lab.nodes.append(node)
        _save(lab)

        # One veth pair per node: p<i> on the bridge, ul0 in the node.
        _run(
            [
                *hub,
                "link",
                "add",
                node.hub_port,
                "type",
                "veth",
                "peer",
                "name",
                NODE_IFNAME,
                "netns",
                ns,
            ]
        )
        _run([*hub, "link", "set", node.hub_port, "master", BRIDGE, "up"])
        _run(["ip", "-n", ns, "addr", "add", node.address, "dev", NODE_IFNAME])
        _run(["ip", "-n", ns, "link", "set", NODE_IFNAME, "up"])


# Running things in a node.


def node_command(lab: Lab, index: int, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in node ``index``'s netns with a private
    /run/wireguard."""
    node = lab.node(index)
    return [
        "ip",
        "netns",
        "exec",
        node.netns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _PRIVATE_MOUNT,
        "gfl-node",
        *argv,
    ]


def lab_spawn(
    lab: Lab,
    index: int,
    argv: Sequence[str],
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in node ``index`` (see ``node_command``) and record it.

    The caller owns the Popen (wait for it); ``lab_down`` ends it if still running.
    """
    proc = subprocess.Popen(
        node_command(lab, index, argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=lab.node(index).state_dir,
    )
    start = start_time(proc.pid)
    root = Path(lab.root)
    with _locked(root):
        current = load_lab(root)
        if start is not None:
            current.processes.append(LabProcess(proc.pid, start, index, list(argv)))
        _save(current)
        lab.processes = current.processes
    logger.debug(
        "lab %s node %d: started pid %d: %s", lab.name, index, proc.pid, " ".join(argv)
    )
    return proc


def lab_exec(
    lab: Lab, index: int, argv: Sequence[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a short command (ip, ss, ...) in node ``index``'s netns and wait."""
    return _run(["ip", "netns", "exec", lab.node(index).netns, *argv], check)


def set_link(lab: Lab, index: int, up: bool) -> None:
    """Cut (``up=False``) or heal node ``index``'s underlay at the bridge port."""
    node = lab.node(index)
    _run(["ip", "-n", lab.hub, "link", "set", node.hub_port, "up" if up else "down"])
    logger.info("lab %s node %d: underlay %s", lab.name, index, "up" if up else "down")


# Status.


@dataclass(frozen=True)
class NodeStatus:
    index: int
    netns: str
    address: str
    exists: bool
    link_up: bool


@dataclass(frozen=True)
class ProcessStatus:
    pid: int
    node: int
    argv: list[str]
    alive: bool


@dataclass(frozen=True)
class LabStatus:
    name: str
    root: str
    nodes: list[NodeStatus]
    processes: list[ProcessStatus]

    def lines(self) -> list[str]:
        """What ``gossipfl lab status`` prints."""
        out = [f"lab {self.name} in {self.root}"]
        for n in self.nodes:
            state = "missing" if not n.exists else ("up" if n.link_up else "cut")
            out.append(f"  node {n.index}  {n.netns:<20} {n.address:<18} {state}")
        for p in self.processes:
            alive = "running" if p.alive else "exited"
            out.append(f"  pid {p.pid:<7} node {p.node}  {alive:<8} {' '.join(p.argv)}")
        return out


def lab_status(root: Path) -> LabStatus:
    lab = load_lab(root)
    existing = set(_run(["ip", "netns", "list"]).stdout.split())
    nodes = []
    for node in lab.nodes:
        link_up = False
        if lab.hub in existing:
            show = _run(["ip", "-n", lab.hub, "link", "show", node.hub_port], False)
            link_up = show.returncode == 0 and ",UP" in show.stdout.split(">")[0]
        nodes.append(
            NodeStatus(
                node.index, node.netns, node.address, node.netns in existing, link_up
            )
        )
    procs = [
        ProcessStatus(p.pid, p.node, p.argv, start_time(p.pid) == p.start_time)
        for p in lab.processes
    ]
    return LabStatus(lab.name, lab.root, nodes, procs)


# Down.


def lab_down(root: Path, stop_timeout_s: float = 15.0) -> None:
    """Remove every namespace, process and file the lab at ``root`` made."""
    lab = load_lab(root)

    # Processes: the recorded ones first, so that each can take down what it
    # started (a daemon its wireguard-go), then anything left in a lab namespace.
    recorded = {p.pid for p in lab.processes if start_time(p.pid) == p.start_time}
    _stop(set(recorded), stop_timeout_s)
    pids = set(recorded)
    existing = set(_run(["ip", "netns", "list"]).stdout.split())
    left: set[int] = set()
    for ns in lab.netns_made:
        if ns in existing:
            listed = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            left.update(int(pid) for pid in listed)
    _stop(left, stop_timeout_s)
    pids |= left

    # Namespaces take their veths, the bridge and any tun device with them.
    for ns in reversed(lab.netns_made):
        if ns in existing:
            _run(["ip", "netns", "del", ns])

    # Files.
    for node in lab.nodes:
        shutil.rmtree(node.state_dir, ignore_errors=True)
    for name in (STATE_FILE, ".lab.lock", STATE_FILE + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    if lab.created_root:
        with contextlib.suppress(OSError):
            root.rmdir()
    if lab.created_run_wireguard:
        with contextlib.suppress(OSError):
            RUN_WIREGUARD.rmdir()  # only when empty: someone may have started using it
    logger.info("lab %s down: %d processes ended", lab.name, len(pids))


def _stop(pids: set[int], timeout_s: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if running(pid)}
        if pids:
            time.sleep(0.02)
    for pid in pids:
        logger.warning("lab: pid %d ignored SIGTERM; killing", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
