"""``gossipfl up``: the node daemon inside a WireGuard mesh found by mDNS.

Order of start-up, each step undone in reverse at shutdown (and by ``gossipfl down``
after a crash):

1. read the membership (mesh public key and our certificate) from the state dir;
2. bring up the WireGuard interface (kernel, else a supervised wireguard-go) with the
   key derived from our identity and the address derived from our public key;
3. start the node with its gossip server bound to the mesh address only, so gossip
   reaches it through the tunnel and never from the underlay;
4. advertise and browse mDNS on the underlay; add the static seeds;
5. every ``record_interval_s``, swap signed endpoint records with one peer over the
   tunnel, so membership spreads beyond one multicast domain.

``MeshAgent`` is the discovery sink. A verified member gets a mesh address (refused
if its key hashes onto one already held), becomes a WireGuard peer (endpoint, allowed
IP = its mesh address /128) and enters the gossip peer set; a peer discovery lost
leaves both once no other source (seed, record) vouches for it. Strangers and
duplicate identities are recorded for status.

Event-loop only. WireGuard changes go through one queue so that a peer seen and lost
in quick succession is applied in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import signal
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from . import discovery as disc
from . import membership as mb
from . import mesh, procs
from .config import Config, MeshSection
from .errors import DecodeError, GossipflError, MeshError, MessageRefused
from .identity import load_or_create_identity, short_id
from .node import MAX_STRANGERS, Node, Notifier, configure_logging, event_loop_runner
from .notify import Notifier as SdNotifier
from .transport import ClientGone, read_body, read_capped

log = logging.getLogger(__name__)

STATE_FILE = "mesh.json"
RECORDS_PATH = "/v1/records"
MAX_RECORDS_BYTES = 64 * 1024
MAX_RECORDS = 256
STATS_INTERVAL_S = 2.0
DOWN_TIMEOUT_S = 20.0


def peer_url(address: ipaddress.IPv6Address, port: int) -> str:
    return f"http://[{address}]:{port}"


def pack_records(records: list[bytes]) -> bytes:
    """Records as a 2-byte count, then a 2-byte length before each."""
    out = bytearray(struct.pack(">H", len(records)))
    for record in records:
        out += struct.pack(">H", len(record)) + record
    return bytes(out)


def unpack_records(data: bytes) -> list[bytes]:
    if len(data) > MAX_RECORDS_BYTES:
        raise MessageRefused("oversized", f"records body of {len(data)} bytes "
                             f"exceeds max {MAX_RECORDS_BYTES}")
    if len(data) < 2:
        raise DecodeError("records body has no count", len(data))
    (count,), pos = struct.unpack_from(">H", data), 2
    if count > MAX_RECORDS:
        raise MessageRefused("oversized", f"{count} records exceed max {MAX_RECORDS}")
    out = []
    for _ in range(count):
        if pos + 2 > len(data):
            raise DecodeError("records body ends inside a length", pos)
        (size,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + size > len(data):
            raise DecodeError(f"record of {size} bytes runs past the body", pos)
        out.append(data[pos: pos + size])
        pos += size
    if pos != len(data):
        raise DecodeError("bytes after the last record", pos)
    return out


class MeshAgent:
    """Keeps WireGuard peers and the gossip peer set in step with discovery."""

    def __init__(self, node: Node, membership: mb.Membership,
                 backend: mesh.WireGuardBackend, cfg: MeshSection) -> None:
        self.node = node
        self.membership = membership
        self.backend = backend
        self.cfg = cfg
        self.mesh_public_key = membership.mesh_public_key
        self.table = mesh.AddressTable(self.mesh_public_key)
        self.address = self.table.claim(node.identity.public_key)
        self.found: dict[bytes, dict[str, Any]] = {}
        self.records: dict[bytes, tuple[int, bytes]] = {}
        self.wg: dict[bytes, mesh.WgPeerStats] = {}
        self.discovery: disc.MdnsDiscovery | None = None
        self._ops: asyncio.Queue[tuple[str, bytes, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.rng = random.Random()

    # --- discovery sink -----------------------------------------------------------

    def peer_seen(self, peer: disc.DiscoveredPeer) -> None:
        key = peer.public_key
        try:
            address = self.table.claim(key)
        except MessageRefused as exc:
            self.node.refused[exc.reason] = self.node.refused.get(exc.reason, 0) + 1
            log.error("%s not added: %s", peer.short_id, exc.detail)
            return
        entry = self.found.setdefault(key, {"how": set(), "endpoint": None})
        new = not entry["how"]
        entry["how"].add(peer.how)
        entry["endpoint"] = peer.endpoint
        self.node.peers.allow([key])
        self.node.peers.upsert(key, peer_url(address, peer.gossip_port), peer.how,
                               peer.cert.name if peer.cert else "")
        self._ops.put_nowait(("set", key, (peer.endpoint, address)))
        if new:
            log.info("%s joined via %s at %s:%d, mesh address %s", peer.short_id,
                     peer.how, peer.endpoint[0], peer.endpoint[1], address)

    def peer_lost(self, public_key: bytes) -> None:
        self._drop(public_key, "mdns")

    def _drop(self, public_key: bytes, how: str) -> None:
        entry = self.found.get(public_key)
        if entry is None:
            return
        entry["how"].discard(how)
        self.node.peers.forget(public_key, how)
        if not entry["how"]:
            del self.found[public_key]
            self.table.release(public_key)
            self._ops.put_nowait(("remove", public_key, None))
            log.info("%s left (no longer announced)", short_id(public_key))

    def stranger_seen(self, public_key: bytes, why: str, address: str = "") -> None:
        if public_key.hex() not in self.node.strangers and \
                len(self.node.strangers) >= MAX_STRANGERS:
            return
        entry = self.node.strangers.setdefault(public_key.hex(), {
            "id": public_key.hex(), "address": address or "?", "messages": 0,
            "reason": why})
        entry["reason"] = why
        entry["address"] = address or entry["address"]
        entry["seen_by"] = "mdns"

    def duplicate_identity(self, address: str) -> None:
        if address not in self.node.duplicate_identity:
            self.node.duplicate_identity.append(address)
            log.error("another box at %s advertises this node's identity %s; give "
                      "each box its own key", address, self.node.identity.short_id)

    # --- life cycle ---------------------------------------------------------------

    async def start(self, gossip_port: int) -> None:
        self._tasks.append(asyncio.create_task(self._apply_ops(), name="wg peers"))
        self._tasks.append(asyncio.create_task(self._refresh_stats(), name="wg stats"))
        if self.cfg.mdns:
            self.discovery = disc.MdnsDiscovery(
                self.node.identity, self.membership, self, self.cfg.listen_port,
                gossip_port, disc.DiscoveryConfig(
                    interfaces=self.cfg.underlay_interfaces or None,
                    exclude=(self.cfg.interface,), grace_s=self.cfg.lost_after_s))
            await self.discovery.start()
        for seed in self.cfg.seeds:
            self.peer_seen(disc.parse_seed(seed, gossip_port))
        self._tasks.append(asyncio.create_task(self._swap_records(gossip_port),
                                               name="endpoint records"))
        for task in self._tasks:
            task.add_done_callback(mesh.log_task_failure)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _apply_ops(self) -> None:
        while True:
            op, key, arg = await self._ops.get()
            wg_key = mesh.wg_public_key(key)
            try:
                if op == "set":
                    endpoint, address = arg
                    await self.backend.set_peer(wg_key, endpoint, [f"{address}/128"],
                                                self.cfg.keepalive_s)
                else:
                    await self.backend.remove_peer(wg_key)
            except MeshError as exc:
                log.warning("%s WireGuard %s failed: %s", short_id(key), op, exc)

    async def _refresh_stats(self) -> None:
        while True:
            try:
                self.wg = {p.public_key: p for p in await self.backend.peers()}
            except MeshError as exc:
                log.warning("reading WireGuard peers failed: %s", exc)
            await asyncio.sleep(STATS_INTERVAL_S)

    # --- endpoint records ---------------------------------------------------------

    async def own_record(self, gossip_port: int) -> bytes:
        addresses = (self.discovery.status().addresses if self.discovery else []) or \
            await disc.underlay_addresses(self.cfg.underlay_interfaces or None,
                                          (self.cfg.interface,))
        endpoints = [(a, self.cfg.listen_port) for a in addresses][:8]
        if not endpoints:
            return b""
        return disc.encode_endpoint_record(self.node.identity, self.membership,
                                           endpoints, gossip_port, time.time())

    def known_records(self) -> list[bytes]:
        return [record for _, record in self.records.values()][: MAX_RECORDS - 1]

    def take_records(self, blobs: list[bytes], sender: str) -> None:
        now = time.time()
        for blob in blobs:
            try:
                record = disc.verify_endpoint_record(blob, self.mesh_public_key, now)
            except MessageRefused as exc:
                log.debug("record from %s refused: %s", sender, exc)
                continue
            key = record.peer.public_key
            if key == self.node.identity.public_key:
                continue
            newest = self.records.get(key)
            if newest is not None and newest[0] >= record.timestamp_ms:
                continue
            self.records[key] = (record.timestamp_ms, blob)
            self.peer_seen(record.peer)

    async def records_handler(self, request: web.Request) -> web.Response:
        try:
            blobs = unpack_records(await read_body(request, MAX_RECORDS_BYTES))
        except MessageRefused as exc:
            return web.json_response({"reason": exc.reason, "detail": exc.detail},
                                     status=400)
        except ClientGone:
            return web.Response(status=400)
        self.take_records(blobs, request.remote or "?")
        mine = await self.own_record(self.cfg.gossip_port)
        reply = self.known_records() + ([mine] if mine else [])
        return web.Response(body=pack_records(reply),
                            content_type="application/octet-stream")

    async def _swap_records(self, gossip_port: int) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self.cfg.record_interval_s *
                                    self.rng.uniform(0.5, 1.5))
                live = self.node.peers.live()
                if not live:
                    continue
                peer = self.rng.choice(live)
                mine = await self.own_record(gossip_port)
                body = pack_records(self.known_records() + ([mine] if mine else []))
                try:
                    async with session.post(peer.address + RECORDS_PATH,
                                            data=body) as response:
                        if response.status != 200:
                            log.info("%s refused our records: HTTP %d",
                                     short_id(peer.public_key), response.status)
                            continue
                        data = await read_capped(response.content,
                                                 MAX_RECORDS_BYTES)
                    self.take_records(unpack_records(data), short_id(peer.public_key))
                except (aiohttp.ClientError, OSError, TimeoutError,
                        MessageRefused) as exc:
                    log.info("%s record swap failed: %s", short_id(peer.public_key),
                             exc)

    # --- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peers = {}
        for key, entry in self.found.items():
            stats = self.wg.get(mesh.wg_public_key(key))
            endpoint = stats.endpoint if stats and stats.endpoint else entry["endpoint"]
            peers[key.hex()] = {
                "mesh_address": str(mesh.mesh_address(self.mesh_public_key, key)),
                "endpoint": mesh.format_endpoint(endpoint) if endpoint else None,
                "latest_handshake": stats.last_handshake_s if stats else None,
                "wg_rx_bytes": stats.rx_bytes if stats else 0,
                "wg_tx_bytes": stats.tx_bytes if stats else 0,
                "found_by": sorted(entry["how"]),
            }
        d = self.discovery.status() if self.discovery else None
        return {"mesh": {
            "interface": self.cfg.interface,
            "backend": self.backend.kind,
            "address": str(self.address),
            "listen_port": self.cfg.listen_port,
            "gossip_port": self.cfg.gossip_port,
            "mesh_public_key": mb.encode_key(self.mesh_public_key),
            "mdns_instance": d.instance if d else None,
            "underlay_addresses": d.addresses if d else [],
            "peers": peers,
        }}

    def peer_status(self, key: bytes) -> dict[str, Any]:
        entry = self.status()["mesh"]["peers"].get(key.hex())
        return {"mesh": entry} if entry else {}


# --- the daemon ---------------------------------------------------------------------


def write_state(config: Config, data: dict[str, Any]) -> None:
    directory = runtime_dir(config)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / STATE_FILE).write_text(json.dumps(data) + "\n")


def runtime_dir(config: Config) -> Path:
    return config.node.runtime_dir or config.node.state_dir


def read_state(config: Config) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((runtime_dir(config) / STATE_FILE)
                                          .read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


def recorded(state: dict[str, Any], key: str) -> int | None:
    """The pid under ``key`` if that very process still runs (start time matches)."""
    pid, started = state.get(key), state.get(key + "_start")
    if isinstance(pid, int) and isinstance(started, int) and \
            procs.same_process(pid, started):
        return pid
    return None


def process_state(config: Config, backend: mesh.WireGuardBackend) -> dict[str, Any]:
    own = os.getpid()
    wg_pid = getattr(backend, "pid", None)
    return {"pid": own, "pid_start": procs.start_time(own),
            "interface": config.mesh.interface if config.mesh else None,
            "backend": backend.kind, "wg_pid": wg_pid,
            "wg_pid_start": procs.start_time(wg_pid) if wg_pid else None}


async def clean_leftovers(config: Config, cfg: MeshSection) -> None:
    """Remove what a crashed ``up`` left behind: child, interface, socket, state."""
    state = read_state(config) or {}
    wg_pid = recorded(state, "wg_pid")
    if wg_pid is not None:
        os.kill(wg_pid, signal.SIGTERM)
        for _ in range(50):
            if not procs.running(wg_pid):
                break
            await asyncio.sleep(0.1)
    ifname = state.get("interface", cfg.interface)
    with contextlib.suppress(MeshError):
        await mesh.run_command(["ip", "link", "del", "dev", ifname], None)
    with contextlib.suppress(FileNotFoundError):
        (mesh.UAPI_SOCKET_DIR / f"{ifname}.sock").unlink()
    with contextlib.suppress(FileNotFoundError):
        (runtime_dir(config) / STATE_FILE).unlink()


async def run_up(config: Config, notifier: Notifier | None = None) -> None:
    if config.mesh is None:
        raise MeshError(f"{config.path}: no [mesh] section; 'gossipfl up' needs one "
                        "(or run 'gossipfl daemon' without a mesh)")
    cfg = config.mesh
    state = read_state(config)
    running = recorded(state, "pid") if state else None
    if running is not None and running != os.getpid():
        raise MeshError(f"gossipfl up already runs as pid {running}; "
                        "'gossipfl down' stops it")
    if state:
        log.info("cleaning up after a previous run that did not stop cleanly")
        await clean_leftovers(config, cfg)
    node_probe, made = load_or_create_identity(config.node.state_dir)
    if made:
        log.info("new identity %s made in %s", node_probe.short_id,
                 config.node.state_dir)
    membership = mb.load_membership(config.node.state_dir, node_probe)
    address = mesh.mesh_interface(membership.mesh_public_key, node_probe.public_key)
    backend = await mesh.choose_backend(cfg.backend)
    await backend.up(cfg.interface, mesh.wg_private_key(node_probe), cfg.listen_port,
                     address, cfg.mtu)
    try:
        write_state(config, process_state(config, backend))
        listen = f"[{address.ip}]:{cfg.gossip_port}"
        node = Node(replace(config, node=replace(config.node, listen=listen)),
                    node_probe)
        agent = MeshAgent(node, membership, backend, cfg)
        node.extra_routes.append(("POST", RECORDS_PATH, agent.records_handler))
        node.extra_status.append(agent.status)
        node.peer_status.append(agent.peer_status)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        await node.start()
        try:
            await agent.start(cfg.gossip_port)
            log.info("mesh up: %s %s (%s), gossip on %s", cfg.interface, address,
                     backend.kind, listen)
            if notifier is not None:
                notifier.ready()
            keeper = asyncio.create_task(keep_state(config, backend))
            try:
                await node.serve_rounds(notifier)
            finally:
                keeper.cancel()
        finally:
            await agent.stop()
            await node.close()
    finally:
        await backend.down()
        with contextlib.suppress(FileNotFoundError):
            (runtime_dir(config) / STATE_FILE).unlink()


async def keep_state(config: Config, backend: mesh.WireGuardBackend) -> None:
    """Rewrite the state file when the supervisor restarted wireguard-go."""
    written = getattr(backend, "pid", None)
    while True:
        await asyncio.sleep(STATS_INTERVAL_S)
        now = getattr(backend, "pid", None)
        if now != written:
            write_state(config, process_state(config, backend))
            written = now


def main_up(config: Config) -> int:
    configure_logging(config.node.log_level)
    import torch

    torch.set_num_threads(1)
    try:
        event_loop_runner()(run_up(config, SdNotifier.from_environ()))
    except GossipflError as exc:
        log.error("%s", exc)
        return 2
    return 0


def main_down(config: Config) -> int:
    """Stop a running ``up`` and remove whatever it made."""
    if config.mesh is None:
        raise MeshError(f"{config.path}: no [mesh] section")
    state = read_state(config)
    pid = recorded(state, "pid") if state else None
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while procs.running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.running(pid):
            os.kill(pid, signal.SIGKILL)
    asyncio.run(clean_leftovers(config, config.mesh))
    return 0
