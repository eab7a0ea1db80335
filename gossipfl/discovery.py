"""Finding peers: mDNS on the underlay, static seeds, signed endpoint records.

mDNS. Each daemon advertises ``_gossipfl._udp.local.`` (RFC 6763 DNS-SD over RFC 6762
multicast DNS) on its underlay interfaces only: the WireGuard interface carries no
multicast, and advertising there would be circular anyway. The TXT record carries
what a peer needs to verify us and add us as a WireGuard peer, one entry per field,
each at most 255 bytes (RFC 6763 section 6.1)::

    v=1                 TXT format version
    pk=<base64>         node Ed25519 public key (43 chars)
    wg=<port>           WireGuard listen port; the SRV port says the same
    gp=<port>           gossip (HTTP) port, reached over the tunnel
    r=<hex>             run tag: random per daemon start (tells clones apart)
    c0=, c1=, ...       membership proof (see gossipfl.membership)

The instance name is ``<hostname>-<short id>-<run tag>``: unique even when two boxes
share a hostname, and even when two boxes share an *identity* (a cloned SD card).
That last case is a *duplicate identity*: an advertisement with our public key but
another run tag from an address that is not ours. Both boxes see it and report it;
stale records of our own previous run come from our own address and are ignored.

Naive way to handle what arrives: trust the TXT record. Chosen way, since anyone on
the LAN can multicast: count and size caps first, then decode every field, then
verify the proof against our mesh public key, and only then tell the sink. A member
goes to ``peer_seen``; a well-formed advertiser that fails verification goes to
``stranger_seen``; garbage is only logged, once per source at WARNING and then at
DEBUG (bounded memory), because a peer controls how often it happens.

A peer is *lost* when its last service has been gone for ``grace_s`` (goodbye packet
or record expiry). Records are registered with a TTL of ``record_ttl_s`` so a peer
that crashes without a goodbye expires in about two minutes rather than zeroconf's
default 75 minutes for PTR records. Local underlay addresses are polled every
``address_poll_s``; when they change the zeroconf instance is rebuilt on the new
interfaces and the service announced again (re-binding is the only way that works on
zeroconf 0.47, Debian 12's version; the APIs used here all exist there).

Beyond one multicast domain, nodes exchange *signed endpoint records* over the
tunnel (the transport carries them)::

    offset  size  field
    0       1     version (1)
    1       32    node public key
    33      1     proof length P (1..MAX_PROOF_BYTES)
    34      P     membership proof
    34+P    8     timestamp, unix milliseconds
    42+P    2     gossip port
    44+P    1     endpoint count E (1..8)
    45+P    ...   E times: family (4 or 6), address (4 or 16 bytes), port (2)
    ...     64    Ed25519 signature by the node key of RECORD_DOMAIN + all above

Static seeds from the configuration (``<node key>@<host>:<wg port>``) become
``DiscoveredPeer`` with ``how="seed"`` and no certificate: the operator vouched for
them, and the transport still checks membership when they talk.

Threading: everything here runs on the daemon's event loop. ``PeerTracker`` holds
the logic and no I/O, so tests drive it with a fake clock; ``MdnsDiscovery`` feeds it
from zeroconf. Left out on purpose: IPv6 mDNS (the underlay in a fleet is IPv4; the
lab's is), unicast DNS-SD, and gossiping endpoint records (the lead's transport).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import re
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from . import membership as mb
from .errors import ConfigError, DecodeError, MeshError, MessageRefused
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, short_id, verify
from .mesh import Runner, log_task_failure, run_command, wg_public_key

logger = logging.getLogger(__name__)

# Protocol values.
SERVICE_TYPE = "_gossipfl._udp.local."
TXT_VERSION = "1"
MAX_TXT_ENTRIES = 16
MAX_INSTANCE_LABEL_BYTES = 63  # RFC 6763 section 4.1.1
RUN_TAG_HEX = 8
RECORD_VERSION = 1
RECORD_DOMAIN = b"gossipfl endpoint record v1\x00"
MAX_RECORD_ENDPOINTS = 8
MAX_RECORD_BYTES = 1 + 32 + 1 + mb.MAX_PROOF_BYTES + 8 + 2 + 1 + 8 * 19 + 64

# Tuning values.
DEFAULT_GRACE_S = 30.0
DEFAULT_RECORD_MAX_AGE_S = 600.0
DEFAULT_CLOCK_SKEW_S = 300.0
ONCE_LOG_ENTRIES = 256

# Refusal reasons (MessageRefused.reason) besides membership's.
STALE = "stale"
FROM_FUTURE = "from_future"
NOT_A_MEMBER = "not_a_member"


@dataclass(frozen=True)
class DiscoveredPeer:
    """A peer someone told us about, verified unless ``how`` is "seed"."""

    public_key: bytes  # Ed25519 node key
    endpoint: tuple[str, int]  # underlay ip, WireGuard port
    gossip_port: int
    how: str  # "mdns", "seed" or "record"
    cert: mb.Certificate | None = None  # None only for seeds
    endpoints: tuple[tuple[str, int], ...] = ()  # every one advertised

    @property
    def short_id(self) -> str:
        return short_id(self.public_key)

    @property
    def wg_public_key(self) -> bytes:
        return wg_public_key(self.public_key)


class DiscoverySink(Protocol):
    """Where discovery delivers what it learns (the daemon's peer set)."""

    def peer_seen(self, peer: DiscoveredPeer) -> None: ...

    def peer_lost(self, public_key: bytes) -> None: ...

    def stranger_seen(self, public_key: bytes, why: str,
                      address: str = "") -> None: ...

    def duplicate_identity(self, address: str) -> None: ...


class OnceLog:
    """Log what a peer can trigger at WARNING once per (source, what), then DEBUG.

    Remembers the last ``size`` keys only, so a flood of sources costs bounded memory.
    """

    def __init__(self, log: logging.Logger, size: int = ONCE_LOG_ENTRIES) -> None:
        self._log = log
        self._seen: collections.OrderedDict[tuple[str, str], None] = (
            collections.OrderedDict()
        )
        self._size = size

    def warning(self, source: str, what: str, msg: str, *args: object) -> None:
        key = (source, what)
        if key in self._seen:
            self._seen.move_to_end(key)
            self._log.debug(msg, *args)
            return
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        self._log.warning(msg + " (further ones at DEBUG)", *args)


# TXT records.


@dataclass(frozen=True)
class Advertisement:
    """One parsed, verified mDNS advertisement."""

    public_key: bytes
    wg_port: int
    gossip_port: int
    run_tag: str
    cert: mb.Certificate
    addresses: tuple[str, ...]


def build_txt(
    identity: Identity,
    membership: mb.Membership,
    wg_port: int,
    gossip_port: int,
    run_tag: str,
) -> dict[str, str]:
    """The TXT entries we advertise; every entry is at most 255 bytes."""
    txt = {
        "v": TXT_VERSION,
        "pk": mb.encode_key(identity.public_key),
        "wg": str(wg_port),
        "gp": str(gossip_port),
        "r": run_tag,
    }
    txt.update(mb.proof_txt_entries(membership.proof))
    for key, value in txt.items():
        size = len(key) + 1 + len(value)
        if size > mb.MAX_TXT_ENTRY_BYTES:
            raise MeshError(f"TXT entry {key} is {size} bytes, max 255")
    return txt


class _Garbage(DecodeError):
    """An advertisement that does not parse; carries the key if it got that far."""

    def __init__(self, detail: str, public_key: bytes | None = None) -> None:
        super().__init__(detail, 0)
        self.public_key = public_key


def _txt_text(props: Mapping[bytes, bytes | None]) -> dict[str, str]:
    if len(props) > MAX_TXT_ENTRIES:
        raise _Garbage(f"{len(props)} TXT entries exceed max {MAX_TXT_ENTRIES}")
    out = {}
    for raw_key, raw_value in props.items():
        value = raw_value or b""
        if len(raw_key) + 1 + len(value) > mb.MAX_TXT_ENTRY_BYTES:
            raise _Garbage(f"TXT entry {raw_key[:16]!r} exceeds 255 bytes")
        try:
            out[raw_key.decode("ascii")] = value.decode("ascii")
        except UnicodeDecodeError:
            raise _Garbage(f"TXT entry {raw_key[:16]!r} is not ASCII") from None
    return out


def _port(txt: Mapping[str, str], key: str) -> int:
    text = txt.get(key)
    if text is None or not text.isdigit() or len(text) > 5:
        raise _Garbage(f"TXT {key}={text!r} is not a port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _Garbage(f"TXT {key}={port} not in 1..65535")
    return port


def parse_advertisement(
    props: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    mesh_public_key: bytes,
    now: float,
) -> Advertisement:
    """Validate an advertisement: caps, decode, then the membership proof.

    Raises ``_Garbage`` (a DecodeError) for what does not parse and MessageRefused
    with a membership reason for a well-formed advertiser that is not a member.
    """
    txt = _txt_text(props)
    if txt.get("v") != TXT_VERSION:
        raise _Garbage(f"TXT v={txt.get('v')!r} is not {TXT_VERSION}")
    try:
        public_key = mb.decode_key(txt.get("pk", ""), "pk")
    except ConfigError as exc:
        raise _Garbage(str(exc)) from None
    try:
        wg_public_key(public_key)
    except MessageRefused as exc:
        raise _Garbage(exc.detail) from None
    wg_port, gossip_port = _port(txt, "wg"), _port(txt, "gp")
    run_tag = txt.get("r", "")
    if not re.fullmatch(f"[0-9a-f]{{{RUN_TAG_HEX}}}", run_tag):
        raise _Garbage(f"TXT r={run_tag[:16]!r} is not {RUN_TAG_HEX} hex digits")
    clean = []
    for address in addresses:
        try:
            clean.append(str(ipaddress.IPv4Address(address)))
        except ValueError:
            raise _Garbage(
                f"address {address[:40]!r} is not IPv4", public_key
            ) from None
    if not clean:
        raise _Garbage("no IPv4 address", public_key)
    try:
        proof = mb.proof_from_txt(txt)
    except DecodeError as exc:
        raise _Garbage(f"proof: {exc}", public_key) from None
    try:
        cert = mb.verify_proof(proof, public_key, mesh_public_key, now)
    except DecodeError as exc:
        raise _Garbage(f"proof: {exc}", public_key) from None
    return Advertisement(public_key, wg_port, gossip_port, run_tag, cert, tuple(clean))


# The logic, without I/O.


@dataclass
class TrackerStatus:
    peers: int
    strangers: int
    garbage: int
    duplicate_addresses: list[str]


class PeerTracker:
    """Turns service sightings into sink calls: seen, lost, stranger, duplicate.

    Event-loop-only. ``clock`` is monotonic seconds (grace periods), ``wall_clock``
    unix seconds (certificate validity); tests pass fakes.
    """

    def __init__(
        self,
        identity: Identity,
        membership: mb.Membership,
        sink: DiscoverySink,
        run_tag: str,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._membership = membership
        self._sink = sink
        self._run_tag = run_tag
        self._grace_s = grace_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._once = OnceLog(logger)
        self.own_addresses: set[str] = set()
        self._names: dict[str, bytes] = {}  # live service name -> node key
        self._gone: dict[bytes, float] = {}  # node key -> when its last name went
        self._strangers: set[bytes] = set()
        self._garbage = 0
        self.duplicates: dict[str, float] = {}  # address -> last seen (clock)

    def service_updated(
        self,
        name: str,
        props: Mapping[bytes, bytes | None],
        addresses: Sequence[str],
    ) -> None:
        """A service was added or changed and resolved to these TXT and addresses."""
        source = addresses[0] if addresses else name
        try:
            ad = parse_advertisement(
                props, addresses, self._membership.mesh_public_key, self._wall_clock()
            )
        except _Garbage as exc:
            self._garbage += 1
            self._once.warning(
                source,
                "garbage",
                "%s: ignoring mDNS advertisement %r: %s",
                source,
                name,
                exc.detail,
            )
            return
        except MessageRefused as exc:
            public_key = _advertised_key(props)
            self._refuse_stranger(source, name, public_key, exc)
            return

        if ad.public_key == self._identity.public_key:
            self._seen_ourselves(name, ad)
            return
        if self._names.get(name, ad.public_key) != ad.public_key:
            self.service_removed(name)  # the name now carries another key
        self._names[name] = ad.public_key
        self._gone.pop(ad.public_key, None)
        endpoints = tuple((a, ad.wg_port) for a in ad.addresses)
        peer = DiscoveredPeer(
            ad.public_key, endpoints[0], ad.gossip_port, "mdns", ad.cert, endpoints
        )
        logger.debug(
            "%s seen by mDNS as %r at %s", peer.short_id, ad.cert.name, endpoints
        )
        self._sink.peer_seen(peer)

    def _refuse_stranger(
        self, source: str, name: str, public_key: bytes | None, exc: MessageRefused
    ) -> None:
        if public_key is None:  # cannot happen: the key parsed before the proof
            self._garbage += 1
            return
        self._strangers.add(public_key)
        self._once.warning(
            short_id(public_key),
            exc.reason,
            "%s refused: advertiser %r at %s is not a member: %s",
            short_id(public_key),
            name,
            source,
            exc.detail,
        )
        self._sink.stranger_seen(public_key, exc.reason, source)

    def _seen_ourselves(self, name: str, ad: Advertisement) -> None:
        if ad.run_tag == self._run_tag:
            return  # our own advertisement, looped back
        foreign = [a for a in ad.addresses if a not in self.own_addresses]
        if not foreign:
            logger.debug("%s: stale record %r of an earlier run of ours", name, name)
            return
        for address in foreign:
            first = address not in self.duplicates
            self.duplicates[address] = self._clock()
            if first:
                logger.error(
                    "%s duplicate identity: %r at %s advertises our key; one of the "
                    "boxes was cloned, give it a new identity",
                    self._identity.short_id,
                    name,
                    address,
                )
            self._sink.duplicate_identity(address)

    def service_removed(self, name: str) -> None:
        """A service said goodbye or expired; its node is lost after the grace."""
        public_key = self._names.pop(name, None)
        if public_key is None:
            return
        if public_key not in self._names.values():
            self._gone.setdefault(public_key, self._clock())
            logger.debug(
                "%s mDNS service %r gone; lost in %.0f s unless it returns",
                short_id(public_key),
                name,
                self._grace_s,
            )

    def forget_all(self) -> None:
        """Every live service goes to grace (the mDNS stack is being rebuilt)."""
        for name in list(self._names):
            self.service_removed(name)

    def tick(self) -> None:
        """Report peers whose grace period ran out; call every second or so."""
        now = self._clock()
        for public_key, since in list(self._gone.items()):
            if now - since >= self._grace_s:
                del self._gone[public_key]
                logger.info(
                    "%s lost: no mDNS advertisement for %.0f s",
                    short_id(public_key),
                    now - since,
                )
                self._sink.peer_lost(public_key)

    def status(self) -> TrackerStatus:
        return TrackerStatus(
            peers=len(set(self._names.values())),
            strangers=len(self._strangers),
            garbage=self._garbage,
            duplicate_addresses=sorted(self.duplicates),
        )


def _advertised_key(props: Mapping[bytes, bytes | None]) -> bytes | None:
    raw = props.get(b"pk")
    if raw is None:
        return None
    try:
        return mb.decode_key(raw.decode("ascii"), "pk")
    except (ConfigError, UnicodeDecodeError):
        return None


# Underlay addresses.


async def underlay_addresses(
    interfaces: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    runner: Runner = run_command,
) -> list[str]:
    """IPv4 addresses of the underlay: up, not loopback, not a tunnel.

    ``interfaces`` limits the search to those names; ``exclude`` drops names (the
    WireGuard interface is dropped anyway: wireguard and tun links are tunnels).
    """
    raw = await runner(["ip", "-j", "-d", "addr", "show"], None)
    try:
        links: list[dict[str, Any]] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MeshError(f"ip -j addr output does not parse: {exc}") from None
    return select_underlay(links, interfaces, exclude)


def select_underlay(
    links: Iterable[Mapping[str, Any]],
    interfaces: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """The pure part of ``underlay_addresses``: filter ``ip -j -d addr`` output."""
    found = []
    for link in links:
        name = link.get("ifname", "")
        flags = link.get("flags", [])
        kind = link.get("linkinfo", {}).get("info_kind", "")
        if interfaces is not None and name not in interfaces:
            continue
        if name in exclude or "UP" not in flags or "LOOPBACK" in flags:
            continue
        if "POINTOPOINT" in flags or kind in ("wireguard", "tun"):
            continue
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet" and addr.get("scope") != "host":
                found.append(str(addr["local"]))
    return sorted(found)


# zeroconf.


@dataclass(frozen=True)
class DiscoveryConfig:
    """How mDNS discovery runs; every time is in seconds."""

    interfaces: tuple[str, ...] | None = None  # None: every underlay interface
    exclude: tuple[str, ...] = ()  # e.g. the WireGuard interface name
    grace_s: float = DEFAULT_GRACE_S
    address_poll_s: float = 5.0
    tick_s: float = 1.0
    resolve_timeout_ms: int = 3000
    record_ttl_s: int = 120
    hostname: str | None = None  # default: socket.gethostname()


@dataclass(frozen=True)
class DiscoveryStatus:
    instance: str
    addresses: list[str]
    peers: int
    strangers: int
    garbage: int
    duplicate_identity: list[str]  # addresses seen with our key since start


def instance_label(hostname: str, public_key: bytes, run_tag: str) -> str:
    """``<hostname>-<short id>-<run tag>``, within one DNS label."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", hostname.split(".")[0]) or "gossipfl"
    suffix = f"-{short_id(public_key)}-{run_tag}"
    return host[: MAX_INSTANCE_LABEL_BYTES - len(suffix)] + suffix


class MdnsDiscovery:
    """Advertise ourselves and browse for peers on the underlay.

    ``start`` once, ``stop`` once, on the daemon's event loop.
    """

    def __init__(
        self,
        identity: Identity,
        membership: mb.Membership,
        sink: DiscoverySink,
        wg_port: int,
        gossip_port: int,
        config: DiscoveryConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        addresses: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        self._config = config or DiscoveryConfig()
        self._identity = identity
        self.run_tag = secrets.token_hex(RUN_TAG_HEX // 2)
        self.instance = instance_label(
            self._config.hostname or socket.gethostname(),
            identity.public_key,
            self.run_tag,
        )
        self._txt = build_txt(identity, membership, wg_port, gossip_port, self.run_tag)
        self._wg_port = wg_port
        self.tracker = PeerTracker(
            identity,
            membership,
            sink,
            self.run_tag,
            self._config.grace_s,
            clock,
            wall_clock,
        )
        self._addresses_fn = addresses or (
            lambda: underlay_addresses(self._config.interfaces, self._config.exclude)
        )
        self._addresses: list[str] = []
        self._zc: Any = None  # AsyncZeroconf; zeroconf ships no stubs we rely on
        self._info: Any = None
        self._browser: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._resolving: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Advertise on the current underlay addresses and start browsing."""
        await self._rebind(await self._addresses_fn())
        self._tasks = [
            asyncio.create_task(self._poll_addresses(), name="mdns address poll"),
            asyncio.create_task(self._tick(), name="mdns grace timer"),
        ]
        for task in self._tasks:
            task.add_done_callback(log_task_failure)

    async def stop(self) -> None:
        """Say goodbye and close zeroconf."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._close_zeroconf()

    def status(self) -> DiscoveryStatus:
        tracked = self.tracker.status()
        return DiscoveryStatus(
            self.instance,
            list(self._addresses),
            tracked.peers,
            tracked.strangers,
            tracked.garbage,
            tracked.duplicate_addresses,
        )

    async def _rebind(self, addresses: list[str]) -> None:
        await self._close_zeroconf()
        self.tracker.forget_all()
        self._addresses = addresses
        self.tracker.own_addresses = set(addresses)
        if not addresses:
            logger.warning(
                "%s no underlay IPv4 address; not advertising, checking again in "
                "%.0f s",
                self._identity.short_id,
                self._config.address_poll_s,
            )
            return
        self._zc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=self._wg_port,
            properties=self._txt,
            server=f"{self.instance}.local.",
        )
        await (
            await self._zc.async_register_service(
                self._info, ttl=self._config.record_ttl_s
            )
        )
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        logger.info(
            "%s advertising %s on %s",
            self._identity.short_id,
            self.instance,
            ", ".join(addresses),
        )

    async def _close_zeroconf(self) -> None:
        for task in self._resolving.values():
            task.cancel()
        await asyncio.gather(*self._resolving.values(), return_exceptions=True)
        self._resolving.clear()
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._info is not None:
            await (await zc.async_unregister_service(self._info))
            self._info = None
        await zc.async_close()

    def _on_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: Any
    ) -> None:
        # Called by zeroconf on our event loop, with these keyword names.
        if state_change is ServiceStateChange.Removed:
            self.tracker.service_removed(name)
            return
        old = self._resolving.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._resolve(zeroconf, name))
        task.add_done_callback(log_task_failure)
        self._resolving[name] = task

    async def _resolve(self, zeroconf: Any, name: str) -> None:
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            found = await info.async_request(zeroconf, self._config.resolve_timeout_ms)
            if found:
                self.tracker.service_updated(
                    name, info.properties, info.parsed_addresses(IPVersion.V4Only)
                )
            else:
                logger.debug("%s: mDNS service did not resolve in time", name)
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    async def _poll_addresses(self) -> None:
        while True:
            await asyncio.sleep(self._config.address_poll_s)
            try:
                current = await self._addresses_fn()
            except MeshError as exc:
                logger.warning("cannot list underlay addresses: %s; retrying", exc)
                continue
            if current != self._addresses:
                logger.info(
                    "%s underlay addresses changed from %s to %s; announcing again",
                    self._identity.short_id,
                    self._addresses,
                    current,
                )
                await self._rebind(current)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._config.tick_s)
            self.tracker.tick()


# Seeds.


def parse_seed(text: str, gossip_port: int) -> DiscoveredPeer:
    """A static seed ``<node key>@<host>:<wg port>`` from the configuration."""
    key_text, at, endpoint = text.strip().partition("@")
    host, colon, port_text = endpoint.rpartition(":")
    host = host.strip("[]")
    if not at or not colon or not port_text.isdigit():
        raise ConfigError(f"seed {text!r} is not <node key>@<host>:<wg port>")
    public_key = mb.decode_key(key_text, "seed node key")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"seed {text!r}: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"seed {text!r}: port {port} not in 1..65535")
    try:
        wg_public_key(public_key)
    except MessageRefused as exc:
        raise ConfigError(f"seed {text!r}: {exc.detail}") from None
    return DiscoveredPeer(
        public_key, (ip, port), gossip_port, "seed", None, ((ip, port),)
    )


# Signed endpoint records.


@dataclass(frozen=True)
class EndpointRecord:
    """A verified record: the peer, and when it signed (keep the newest per key)."""

    peer: DiscoveredPeer
    timestamp_ms: int


def encode_endpoint_record(
    identity: Identity,
    membership: mb.Membership,
    endpoints: Sequence[tuple[str, int]],
    gossip_port: int,
    now: float,
) -> bytes:
    """Our endpoints, signed by our node key, for peers beyond multicast range."""
    if not 1 <= len(endpoints) <= MAX_RECORD_ENDPOINTS:
        raise ConfigError(
            f"{len(endpoints)} endpoints not in 1..{MAX_RECORD_ENDPOINTS}"
        )
    proof = membership.proof
    out = bytearray([RECORD_VERSION]) + identity.public_key
    out += bytes([len(proof)]) + proof
    out += struct.pack(">QHB", int(now * 1000), gossip_port, len(endpoints))
    for host, port in endpoints:
        ip = ipaddress.ip_address(host)
        out += bytes([ip.version]) + ip.packed + struct.pack(">H", port)
    body = bytes(out)
    return body + identity.sign(RECORD_DOMAIN + body)


def verify_endpoint_record(
    data: bytes,
    mesh_public_key: bytes,
    now: float,
    max_age_s: float = DEFAULT_RECORD_MAX_AGE_S,
    max_skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> EndpointRecord:
    """Parse and check a record: caps, layout, signature, freshness, membership."""
    if len(data) > MAX_RECORD_BYTES:
        raise DecodeError(
            f"endpoint record of {len(data)} bytes exceeds max {MAX_RECORD_BYTES}",
            MAX_RECORD_BYTES,
        )
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise DecodeError(f"endpoint record ends inside {what}", pos)
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    if take(1, "version")[0] != RECORD_VERSION:
        raise DecodeError(f"endpoint record version {data[0]} is not 1", 0)
    public_key = take(PUBLIC_KEY_BYTES, "node key")
    at = pos
    proof_len = take(1, "proof length")[0]
    if not 1 <= proof_len <= mb.MAX_PROOF_BYTES:
        raise DecodeError(
            f"proof length {proof_len} not in 1..{mb.MAX_PROOF_BYTES}", at
        )
    proof = take(proof_len, "proof")
    timestamp_ms, gossip_port, count = struct.unpack(">QHB", take(11, "header"))
    if not 1 <= count <= MAX_RECORD_ENDPOINTS:
        raise DecodeError(
            f"{count} endpoints not in 1..{MAX_RECORD_ENDPOINTS}", pos - 1
        )
    endpoints: list[tuple[str, int]] = []
    for _ in range(count):
        at = pos
        family = take(1, "address family")[0]
        if family not in (4, 6):
            raise DecodeError(f"address family {family} is not 4 or 6", at)
        raw = take(4 if family == 4 else 16, "address")
        (port,) = struct.unpack(">H", take(2, "port"))
        ip = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
        endpoints.append((str(ip), port))
    body_end = pos
    signature = take(SIGNATURE_BYTES, "signature")
    if pos != len(data):
        raise DecodeError(f"{len(data) - pos} trailing bytes", pos)

    who = short_id(public_key)
    if not verify(public_key, RECORD_DOMAIN + data[:body_end], signature):
        raise MessageRefused(mb.BAD_SIGNATURE, f"{who}: endpoint record signature")
    age_s = now - timestamp_ms / 1000
    if age_s > max_age_s:
        raise MessageRefused(
            STALE, f"{who}: record is {age_s:.0f} s old, max {max_age_s:.0f}"
        )
    if -age_s > max_skew_s:
        raise MessageRefused(
            FROM_FUTURE, f"{who}: record is {-age_s:.0f} s in the future"
        )
    if gossip_port == 0 or any(port == 0 for _, port in endpoints):
        raise MessageRefused("malformed", f"{who}: port 0 in endpoint record")
    wg_public_key(public_key)  # refuses a key that is not a curve point
    cert = mb.verify_proof(proof, public_key, mesh_public_key, now, max_skew_s)
    peer = DiscoveredPeer(
        public_key, endpoints[0], gossip_port, "record", cert, tuple(endpoints)
    )
    return EndpointRecord(peer, timestamp_ms)
