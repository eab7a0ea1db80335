"""The WireGuard mesh: keys, addresses and the interface, kernel or userspace.

Keys. Naive way: a second, separate X25519 key pair for WireGuard, exchanged and
pinned next to the Ed25519 identity; two identities per node to keep in step. Chosen
way: the WireGuard private key is the node's Ed25519 seed converted to X25519
(``SigningKey.to_curve25519_private_key()``, the birational map of RFC 7748 section
4.1), so a peer's WireGuard public key follows from its Ed25519 public key alone
(``VerifyKey.to_curve25519_public_key()``). One identity per node; a membership
certificate for the Ed25519 key vouches for the tunnel key too. Using one secret for
signing and for Diffie-Hellman is the same trade Signal's XEdDSA makes in reverse;
it is sound for these two primitives, and the seed never leaves the box.

Addresses. Naive way: a central allocator or a DHCP-like lease; a server to run.
Chosen way: every address follows from public keys. The mesh prefix is an RFC 4193
ULA /64: ``fd`` + 40 bits of SHA-256(mesh public key) as the global id + subnet 0.
The host part is 64 bits of SHA-256(node public key). Two of n nodes collide with
probability about n^2 / 2^65: 3e-14 for 1000 nodes, 3e-10 for 100,000. That is too
unlikely to design around, not too unlikely to notice: ``AddressTable`` refuses a
second key claiming an address already held, so a collision shows up as a refused
peer with a clear reason instead of traffic silently going to the wrong box. Host
parts that are reserved (all zeros, the RFC 2526 anycast range) are rehashed.

Interface. ``WireGuardBackend`` is the one surface the daemon drives; two
implementations sit behind it:

* ``KernelBackend``: ``ip link add type wireguard`` and wg(8), when the kernel has
  the module. wg(8) speaks netlink for us.
* ``UserspaceBackend``: a supervised ``wireguard-go -f <ifname>`` child, configured
  over its UAPI unix socket ``/run/wireguard/<ifname>.sock`` with the documented
  key=value protocol (``set=1`` / ``get=1``, hex keys, a blank line ends a request,
  ``errno=N`` ends a reply). If the child dies it is restarted and its configuration
  replayed, up to ``max_restarts`` times; after that every call raises MeshError.

``choose_backend()`` probes the kernel path and falls back to userspace. Every method
is a coroutine and must run on the event loop that called ``up``; a backend drives
one interface. All subprocesses are asyncio children; failures raise MeshError naming
the command and its stderr.

Left out on purpose: preshared keys (membership already keeps strangers out), fwmark
and policy routing, IPv4 mesh addresses (198.18.0.0/15 would need a collision-prone
16-bit host part; the /64 is enough).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from .errors import MeshError, MessageRefused
from .identity import Identity, short_id

logger = logging.getLogger(__name__)

# Protocol values.
WG_KEY_BYTES = 32
MESH_PREFIX_LEN = 64
UAPI_SOCKET_DIR = Path("/run/wireguard")
MAX_UAPI_REPLY_BYTES = 1 << 20
IFNAME_MAX_CHARS = 15  # IFNAMSIZ - 1

# Tuning values.
DEFAULT_MTU = 1420  # 1500 underlay - 80 (IPv6 40 + UDP 8 + WireGuard 32)
DEFAULT_LISTEN_PORT = 51820
DEFAULT_KEEPALIVE_S = 25
COMMAND_TIMEOUT_S = 20.0

ADDRESS_COLLISION = "address_collision"
BAD_KEY = "bad_key"

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


# Keys.


def wg_private_key(identity: Identity) -> bytes:
    """This node's WireGuard private key: its Ed25519 seed mapped to X25519."""
    return bytes(identity.signing_key.to_curve25519_private_key())


def wg_public_key(node_public_key: bytes) -> bytes:
    """A node's WireGuard public key, from its Ed25519 public key."""
    try:
        return bytes(VerifyKey(node_public_key).to_curve25519_public_key())
    except (CryptoError, ValueError, TypeError):
        raise MessageRefused(
            BAD_KEY, f"{node_public_key.hex()[:16]} is not an Ed25519 public key"
        ) from None


def wg_key_text(key: bytes) -> str:
    """The base64 form wg(8) and wg-quick files use."""
    return base64.b64encode(key).decode("ascii")


# Addresses.


def mesh_prefix(mesh_public_key: bytes) -> ipaddress.IPv6Network:
    """The mesh's ULA /64: fd + 40-bit global id from the mesh key + subnet 0."""
    global_id = hashlib.sha256(b"gossipfl mesh prefix\x00" + mesh_public_key).digest()
    raw = b"\xfd" + global_id[:5] + b"\x00\x00" + bytes(8)
    return ipaddress.IPv6Network((raw, MESH_PREFIX_LEN))


def _reserved_host(host: int) -> bool:
    # All zeros is the subnet-router anycast; RFC 2526 reserves the top 128.
    return host == 0 or host >= (1 << 64) - 128


def mesh_address(
    mesh_public_key: bytes, node_public_key: bytes
) -> ipaddress.IPv6Address:
    """A node's mesh address: the mesh prefix + 64 bits hashed from its key."""
    prefix = int(mesh_prefix(mesh_public_key).network_address)
    for counter in range(256):
        digest = hashlib.sha256(
            b"gossipfl mesh host\x00" + bytes([counter]) + node_public_key
        ).digest()
        host = int.from_bytes(digest[:8], "big")
        if not _reserved_host(host):
            return ipaddress.IPv6Address(prefix | host)
    raise MeshError("no usable host part in 256 hashes; this cannot happen")


def mesh_interface(
    mesh_public_key: bytes, node_public_key: bytes
) -> ipaddress.IPv6Interface:
    """The address to put on our interface: our mesh address with the mesh /64."""
    address = mesh_address(mesh_public_key, node_public_key)
    return ipaddress.IPv6Interface(f"{address}/{MESH_PREFIX_LEN}")


class AddressTable:
    """Which node key holds which mesh address; refuses a second claimant.

    Event-loop-only; owned by whoever adds peers to the backend.
    """

    def __init__(
        self,
        mesh_public_key: bytes,
        address_of: Callable[[bytes, bytes], ipaddress.IPv6Address] | None = None,
    ) -> None:
        self._mesh = mesh_public_key
        self._address_of = address_of or mesh_address  # tests force a collision
        self._owner: dict[ipaddress.IPv6Address, bytes] = {}

    def claim(self, node_public_key: bytes) -> ipaddress.IPv6Address:
        """The node's address, recorded; MessageRefused if another key holds it."""
        address = self._address_of(self._mesh, node_public_key)
        owner = self._owner.setdefault(address, node_public_key)
        if owner != node_public_key:
            raise MessageRefused(
                ADDRESS_COLLISION,
                f"{short_id(node_public_key)} hashes to {address}, already held by "
                f"{short_id(owner)}",
            )
        return address

    def release(self, node_public_key: bytes) -> None:
        address = self._address_of(self._mesh, node_public_key)
        if self._owner.get(address) == node_public_key:
            del self._owner[address]

    def owner(self, address: ipaddress.IPv6Address) -> bytes | None:
        return self._owner.get(address)


# Background tasks.


def log_task_failure(task: asyncio.Task[None]) -> None:
    """Done-callback for long-lived tasks: a crash is logged with its traceback.

    Without it an exception in a background task is silent until the task object
    is garbage collected; the bug it shows must not hide.
    """
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("task %r crashed", task.get_name(), exc_info=exc)


# Commands.

Runner = Callable[[Sequence[str], bytes | None], Awaitable[str]]


async def run_command(argv: Sequence[str], stdin: bytes | None = None) -> str:
    """Run ``argv``; its stdout, or MeshError naming the command and its stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else None,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise MeshError(f"failed to run {' '.join(argv)}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), COMMAND_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise MeshError(
            f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT_S} s"
        ) from None
    if proc.returncode != 0:
        raise MeshError(
            f"{' '.join(argv)} failed with exit {proc.returncode}: "
            f"{err.decode(errors='replace').strip()}"
        )
    return out.decode(errors="replace")


def check_ifname(ifname: str) -> None:
    if not 1 <= len(ifname) <= IFNAME_MAX_CHARS or not all(
        c.isalnum() or c in "-_." for c in ifname
    ):
        raise MeshError(
            f"interface name {ifname!r} must be 1..{IFNAME_MAX_CHARS} of [A-Za-z0-9-_.]"
        )


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """``1.2.3.4:5`` or ``[::1]:5`` to (host, port); None for ``(none)`` or empty."""
    if not text or text == "(none)":
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        raise MeshError(f"endpoint {text!r} has no port")
    return host.strip("[]"), int(port)


# Peer state.


@dataclass(frozen=True)
class WgPeerStats:
    """One peer as the interface sees it."""

    public_key: bytes  # WireGuard (X25519) key
    endpoint: tuple[str, int] | None
    last_handshake_s: float | None  # unix time; None before the first handshake
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[str, ...] = ()
    keepalive_s: int = 0


@dataclass
class _PeerConfig:
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    keepalive_s: int


@dataclass
class _InterfaceConfig:
    ifname: str
    private_key: bytes
    listen_port: int
    address: IPInterface
    mtu: int
    peers: dict[bytes, _PeerConfig] = field(default_factory=dict)


class WireGuardBackend(abc.ABC):
    """One WireGuard interface. Event-loop-only; ``up`` once, ``down`` once."""

    kind: str

    def __init__(self, runner: Runner = run_command) -> None:
        self._run = runner
        self._config: _InterfaceConfig | None = None

    @property
    def ifname(self) -> str | None:
        return self._config.ifname if self._config else None

    async def up(
        self,
        ifname: str,
        private_key: bytes,
        listen_port: int,
        address: IPInterface,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        """Create the interface, give it our key, port and address, bring it up."""
        check_ifname(ifname)
        if len(private_key) != WG_KEY_BYTES:
            raise MeshError(f"private key is {len(private_key)} bytes, expected 32")
        if not 0 <= listen_port <= 65535:
            raise MeshError(f"listen port {listen_port} not in 0..65535")
        if not 1280 <= mtu <= 65535:
            raise MeshError(f"MTU {mtu} not in 1280..65535 (IPv6 needs 1280)")
        if self._config is not None:
            raise MeshError(f"{self._config.ifname} is already up")
        self._config = _InterfaceConfig(ifname, private_key, listen_port, address, mtu)
        try:
            await self._create()
            await self._configure_link()
        except (MeshError, asyncio.CancelledError):
            self._config = None
            try:
                await self._destroy(ifname)
            except MeshError as exc:
                logger.warning("%s: cleanup after a failed up: %s", ifname, exc)
            raise
        logger.info(
            "%s up (%s): %s, port %d, mtu %d",
            ifname,
            self.kind,
            address,
            listen_port,
            mtu,
        )

    async def set_peer(
        self,
        public_key: bytes,
        endpoint: tuple[str, int] | None,
        allowed_ips: Sequence[str],
        keepalive_s: int = DEFAULT_KEEPALIVE_S,
    ) -> None:
        """Add or update a peer; its allowed IPs are replaced, not merged."""
        config = self._require_up()
        if len(public_key) != WG_KEY_BYTES:
            raise MeshError(f"peer key is {len(public_key)} bytes, expected 32")
        nets = tuple(str(ipaddress.ip_network(ip, strict=False)) for ip in allowed_ips)
        if endpoint is not None:
            format_endpoint(endpoint)  # validates
        peer = _PeerConfig(endpoint, nets, keepalive_s)
        await self._set_peer(public_key, peer)
        config.peers[public_key] = peer
        logger.debug(
            "%s peer set on %s: endpoint %s, allowed %s",
            short_id(public_key),
            config.ifname,
            endpoint,
            ",".join(nets),
        )

    async def remove_peer(self, public_key: bytes) -> None:
        config = self._require_up()
        await self._remove_peer(public_key)
        config.peers.pop(public_key, None)
        logger.debug("%s peer removed from %s", short_id(public_key), config.ifname)

    @abc.abstractmethod
    async def peers(self) -> list[WgPeerStats]:
        """Every peer with its endpoint, last handshake and byte counters."""

    async def down(self) -> None:
        """Remove everything ``up`` made; safe to call twice or after a failed up."""
        config, self._config = self._config, None
        if config is None:
            return
        await self._destroy(config.ifname)
        logger.info("%s down (%s)", config.ifname, self.kind)

    def _require_up(self) -> _InterfaceConfig:
        if self._config is None:
            raise MeshError("the WireGuard interface is not up")
        return self._config

    async def _configure_link(self) -> None:
        config = self._require_up()
        family = "-6" if config.address.version == 6 else "-4"
        await self._run(
            ["ip", family, "addr", "add", str(config.address), "dev", config.ifname]
            + (["nodad"] if config.address.version == 6 else []),
            None,
        )
        await self._run(
            ["ip", "link", "set", "dev", config.ifname, "mtu", str(config.mtu), "up"],
            None,
        )

    @abc.abstractmethod
    async def _create(self) -> None:
        """Make the interface and set its private key and port."""

    @abc.abstractmethod
    async def _set_peer(self, public_key: bytes, peer: _PeerConfig) -> None: ...

    @abc.abstractmethod
    async def _remove_peer(self, public_key: bytes) -> None: ...

    @abc.abstractmethod
    async def _destroy(self, ifname: str) -> None: ...


# Kernel.


class KernelBackend(WireGuardBackend):
    """The in-kernel WireGuard device, driven through ip(8) and wg(8)."""

    kind = "kernel"
    _created = False

    async def _create(self) -> None:
        config = self._require_up()
        await self._run(
            ["ip", "link", "add", "dev", config.ifname, "type", "wireguard"], None
        )
        self._created = True
        await self._run(
            [
                "wg",
                "set",
                config.ifname,
                "private-key",
                "/dev/stdin",
                "listen-port",
                str(config.listen_port),
            ],
            wg_key_text(config.private_key).encode() + b"\n",
        )

    async def _set_peer(self, public_key: bytes, peer: _PeerConfig) -> None:
        config = self._require_up()
        argv = ["wg", "set", config.ifname, "peer", wg_key_text(public_key)]
        if peer.endpoint is not None:
            argv += ["endpoint", format_endpoint(peer.endpoint)]
        argv += ["persistent-keepalive", str(peer.keepalive_s)]
        argv += ["allowed-ips", ",".join(peer.allowed_ips)]
        await self._run(argv, None)

    async def _remove_peer(self, public_key: bytes) -> None:
        config = self._require_up()
        await self._run(
            ["wg", "set", config.ifname, "peer", wg_key_text(public_key), "remove"],
            None,
        )

    async def peers(self) -> list[WgPeerStats]:
        config = self._require_up()
        dump = await self._run(["wg", "show", config.ifname, "dump"], None)
        try:
            return parse_wg_dump(dump)
        except (ValueError, binascii.Error) as exc:
            raise MeshError(f"wg show dump does not parse: {exc!r}") from None

    async def _destroy(self, ifname: str) -> None:
        if self._created:  # never delete an interface someone else made
            self._created = False
            await self._run(["ip", "link", "del", "dev", ifname], None)


def parse_wg_dump(text: str) -> list[WgPeerStats]:
    """Peers from ``wg show IF dump``: the first line is the interface itself."""
    peers = []
    for line in text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) != 8:
            raise MeshError(f"wg dump line has {len(cols)} columns, expected 8")
        key, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
        peers.append(
            WgPeerStats(
                public_key=base64.b64decode(key),
                endpoint=parse_endpoint(endpoint),
                last_handshake_s=float(handshake) or None,
                rx_bytes=int(rx),
                tx_bytes=int(tx),
                allowed_ips=() if allowed == "(none)" else tuple(allowed.split(",")),
                keepalive_s=0 if keepalive == "off" else int(keepalive),
            )
        )
    return peers


# Userspace.


def uapi_set_interface(private_key: bytes, listen_port: int) -> str:
    return (
        f"set=1\nprivate_key={private_key.hex()}\nlisten_port={listen_port}\n"
        "replace_peers=true\n\n"
    )


def uapi_set_peer(
    public_key: bytes,
    endpoint: tuple[str, int] | None,
    allowed_ips: Sequence[str],
    keepalive_s: int,
) -> str:
    lines = ["set=1", f"public_key={public_key.hex()}"]
    if endpoint is not None:
        lines.append(f"endpoint={format_endpoint(endpoint)}")
    lines.append(f"persistent_keepalive_interval={keepalive_s}")
    lines.append("replace_allowed_ips=true")
    lines += [f"allowed_ip={ip}" for ip in allowed_ips]
    return "\n".join(lines) + "\n\n"


def uapi_remove_peer(public_key: bytes) -> str:
    return f"set=1\npublic_key={public_key.hex()}\nremove=true\n\n"


def parse_uapi_get(text: str) -> list[WgPeerStats]:
    """Peers from a ``get=1`` reply; lines before the first public_key are ours."""
    peers: list[WgPeerStats] = []
    current: dict[str, list[str]] | None = None

    def finish() -> None:
        if current is None:
            return
        sec = int(current.get("last_handshake_time_sec", ["0"])[0])
        nsec = int(current.get("last_handshake_time_nsec", ["0"])[0])
        endpoint = current.get("endpoint", [""])[0]
        peers.append(
            WgPeerStats(
                public_key=bytes.fromhex(current["public_key"][0]),
                endpoint=parse_endpoint(endpoint),
                last_handshake_s=(sec + nsec / 1e9) if sec or nsec else None,
                rx_bytes=int(current.get("rx_bytes", ["0"])[0]),
                tx_bytes=int(current.get("tx_bytes", ["0"])[0]),
                allowed_ips=tuple(current.get("allowed_ip", [])),
                keepalive_s=int(current.get("persistent_keepalive_interval", ["0"])[0]),
            )
        )

    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "public_key":
            finish()
            current = {}
        if current is not None:
            current.setdefault(key, []).append(value)
    finish()
    return peers


async def uapi_request(socket_path: Path, request: str) -> str:
    """Send one UAPI request; the reply without its ``errno=0`` line."""
    try:
        reader, writer = await asyncio.open_unix_connection(
            str(socket_path), limit=MAX_UAPI_REPLY_BYTES
        )
    except OSError as exc:
        raise MeshError(f"failed to connect to {socket_path}: {exc}") from None
    try:
        writer.write(request.encode("ascii"))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), COMMAND_TIMEOUT_S)
    except asyncio.LimitOverrunError:
        raise MeshError(f"UAPI reply from {socket_path} is too long") from None
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise MeshError(f"UAPI request to {socket_path} failed: {exc!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    text = reply.decode("ascii", errors="replace")
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith("errno="):
        body, last = text, ""
    if last != "errno=0":
        op = request.split("\n", 1)[0]
        raise MeshError(f"UAPI {op} on {socket_path} failed: {last or text.strip()}")
    return body


@dataclass(frozen=True)
class UserspaceConfig:
    """How to run and supervise wireguard-go."""

    argv: Sequence[str] = ("wireguard-go",)  # "-f <ifname>" is appended
    socket_dir: Path = UAPI_SOCKET_DIR
    start_timeout_s: float = 10.0
    stop_timeout_s: float = 5.0
    poll_interval_s: float = 0.02
    max_restarts: int = 3
    restart_backoff_s: float = 1.0
    output_lines_kept: int = 20


class UserspaceBackend(WireGuardBackend):
    """wireguard-go as a supervised child, configured through its UAPI socket."""

    kind = "userspace"

    def __init__(
        self,
        config: UserspaceConfig | None = None,
        runner: Runner = run_command,
        on_failure: Callable[[MeshError], None] | None = None,
    ) -> None:
        super().__init__(runner)
        self._uc = config or UserspaceConfig()
        self._on_failure = on_failure
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._output: collections.deque[str] = collections.deque(
            maxlen=self._uc.output_lines_kept
        )
        self._lock = asyncio.Lock()
        self._failure: MeshError | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._spawned = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def failure(self) -> MeshError | None:
        """Why the child is gone for good; None while it is supervised."""
        return self._failure

    def socket_path(self, ifname: str) -> Path:
        return self._uc.socket_dir / f"{ifname}.sock"

    async def peers(self) -> list[WgPeerStats]:
        reply = await self._uapi("get=1\n\n")
        try:
            return parse_uapi_get(reply)
        except (ValueError, KeyError) as exc:
            raise MeshError(f"UAPI get reply does not parse: {exc!r}") from None

    async def _create(self) -> None:
        config = self._require_up()
        if self.socket_path(config.ifname).exists():
            raise MeshError(
                f"{self.socket_path(config.ifname)} exists: another wireguard-go "
                f"serves {config.ifname}"
            )
        await self._spawn()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"wireguard-go {config.ifname}"
        )
        self._supervisor.add_done_callback(log_task_failure)

    async def _spawn(self) -> None:
        config = self._require_up()
        argv = [*self._uc.argv, "-f", config.ifname]
        env = dict(os.environ)
        env.setdefault(
            "LOG_LEVEL", "verbose" if logger.isEnabledFor(logging.DEBUG) else "error"
        )
        try:
            # A session of its own: Ctrl-C on the terminal of `gossipfl up` must
            # reach the daemon only, which then stops the child itself (down()).
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise MeshError(f"failed to start {' '.join(argv)}: {exc}") from None
        proc = self._proc
        self._spawned = True
        logger.debug("%s: started wireguard-go pid %d", config.ifname, proc.pid)
        self._readers.add(asyncio.create_task(self._read_output(proc, config.ifname)))
        try:
            await self._wait_for_socket(proc, config.ifname)
            await self._uapi_now(
                uapi_set_interface(config.private_key, config.listen_port)
            )
        except (MeshError, asyncio.CancelledError):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise

    async def _wait_for_socket(
        self, proc: asyncio.subprocess.Process, ifname: str
    ) -> None:
        path = self.socket_path(ifname)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._uc.start_timeout_s
        while not path.exists():
            if proc.returncode is not None:
                raise MeshError(
                    f"wireguard-go for {ifname} exited with {proc.returncode} before "
                    f"making {path}: {self._recent_output()}"
                )
            if loop.time() > deadline:
                raise MeshError(
                    f"wireguard-go made no {path} in {self._uc.start_timeout_s} s: "
                    f"{self._recent_output()}"
                )
            await asyncio.sleep(self._uc.poll_interval_s)

    async def _read_output(self, proc: asyncio.subprocess.Process, ifname: str) -> None:
        try:
            if proc.stdout is None:
                return
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self._output.append(line)
                logger.debug("%s: wireguard-go: %s", ifname, line)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._readers.discard(task)

    def _recent_output(self) -> str:
        return " | ".join(self._output) or "(no output)"

    async def _supervise(self) -> None:
        while True:
            proc = self._proc
            config = self._config
            if proc is None or config is None:
                return
            code = await proc.wait()
            if self._config is None:
                return  # down() is stopping it
            if self.restarts >= self._uc.max_restarts:
                self._fail(
                    MeshError(
                        f"wireguard-go for {config.ifname} exited with {code} after "
                        f"{self.restarts} restarts; giving up: {self._recent_output()}"
                    )
                )
                return
            self.restarts += 1
            logger.error(
                "%s: wireguard-go exited with %s: %s; restarting, try %d of %d",
                config.ifname,
                code,
                self._recent_output(),
                self.restarts,
                self._uc.max_restarts,
            )
            await asyncio.sleep(self._uc.restart_backoff_s)
            try:
                async with self._lock:
                    await self._respawn(config)
            except MeshError as exc:
                logger.error("%s: restart failed: %s", config.ifname, exc)
                continue  # the dead child is awaited again and counted
            logger.info(
                "%s: wireguard-go restarted, %d peers replayed",
                config.ifname,
                len(config.peers),
            )

    async def _respawn(self, config: _InterfaceConfig) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(config.ifname).unlink()
        await self._spawn()
        for key, peer in config.peers.items():
            await self._uapi_now(
                uapi_set_peer(key, peer.endpoint, peer.allowed_ips, peer.keepalive_s)
            )
        await self._configure_link()

    def _fail(self, error: MeshError) -> None:
        logger.error("%s", error)
        self._failure = error
        if self._on_failure is not None:
            self._on_failure(error)

    async def _set_peer(self, public_key: bytes, peer: _PeerConfig) -> None:
        await self._uapi(
            uapi_set_peer(public_key, peer.endpoint, peer.allowed_ips, peer.keepalive_s)
        )

    async def _remove_peer(self, public_key: bytes) -> None:
        await self._uapi(uapi_remove_peer(public_key))

    async def _uapi(self, request: str) -> str:
        if self._failure is not None:
            raise self._failure
        async with self._lock:
            return await self._uapi_now(request)

    async def _uapi_now(self, request: str) -> str:
        config = self._require_up()
        return await uapi_request(self.socket_path(config.ifname), request)

    async def _destroy(self, ifname: str) -> None:
        if not self._spawned:  # the interface and socket are someone else's
            return
        self._spawned = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._uc.stop_timeout_s)
            except TimeoutError:
                logger.warning("%s: wireguard-go ignored SIGTERM; killing", ifname)
                proc.kill()
                await proc.wait()
        for task in list(self._readers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, self._uc.stop_timeout_s)

        # wireguard-go removes both on a clean exit; not after SIGKILL or a crash.
        with contextlib.suppress(MeshError):
            await self._run(["ip", "link", "del", "dev", ifname], None)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(ifname).unlink()


async def kernel_wireguard_available(runner: Runner = run_command) -> bool:
    """True when ``ip link add type wireguard`` works here (module present)."""
    probe = f"gflprobe{os.getpid() % 100000}"
    try:
        await runner(["ip", "link", "add", "dev", probe, "type", "wireguard"], None)
    except MeshError:
        return False
    await runner(["ip", "link", "del", "dev", probe], None)
    return True


async def choose_backend(
    prefer: str = "auto",
    runner: Runner = run_command,
    userspace: UserspaceConfig | None = None,
    on_failure: Callable[[MeshError], None] | None = None,
) -> WireGuardBackend:
    """The kernel backend when it works, else wireguard-go; ``prefer`` can force one.

    ``prefer`` is "auto", "kernel" or "userspace".
    """
    if prefer not in ("auto", "kernel", "userspace"):
        raise MeshError(f"backend {prefer!r} is not auto, kernel or userspace")
    if prefer != "userspace":
        if await kernel_wireguard_available(runner):
            return KernelBackend(runner)
        if prefer == "kernel":
            raise MeshError("kernel WireGuard is not available (ip link add failed)")
    uc = userspace or UserspaceConfig()
    if shutil.which(uc.argv[0]) is None:
        raise MeshError(
            f"no kernel WireGuard and no {uc.argv[0]} on PATH; install wireguard-go"
        )
    logger.info("kernel WireGuard unavailable; using %s", uc.argv[0])
    return UserspaceBackend(uc, runner, on_failure)
