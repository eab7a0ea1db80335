"""The node daemon: wires training, compression, transport, merge and gossip together.

One asyncio event loop (uvloop when installed) runs three servers and one loop:

* the gossip server (``transport``) on ``node.listen``: each request is checked and
  merged by the ``GossipEngine`` in a worker thread, under the model lock;
* the control server on a unix socket (mode 0600) in the runtime directory:
  ``GET /v1/status`` (JSON) and ``GET /v1/model`` (the raw float32 vector), answered
  from the event loop without the model lock, so status answers while a merge runs;
* the round loop: local training steps (worker thread, model lock), evaluation, then
  exchanges with ``fanout`` peers picked at random from the live peer set. Exchanges
  run as tasks: a slow or dead peer holds only its own edge, never the round.

There is no barrier and no coordinator: every node runs the same loop at its own
pace. Checkpoints are written every ``checkpoint_interval_s`` and at shutdown.

Ownership: the model vector, the edges' copies and counters are written only by
worker threads holding ``model_lock``. The event loop reads the engine's dicts
(counts, edges) only through single C-level operations (``get``, ``list()``,
``set()``), which the GIL makes atomic; the peer set and the node's own refusal
records belong to the event loop alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import torch
from aiohttp import web

from . import __version__, checkpoint
from .codec import max_message_bytes
from .compress import CompressionSpec
from .config import Config, parse_listen
from .errors import ConfigError, GossipflError, MessageRefused, StateError
from .gossip import GossipEngine, Pending
from .identity import Identity, load_or_create_identity, short_id
from .merge import select as select_merge
from .notify import Notifier as SdNotifier
from .peers import PeerSet
from .train import FlatModel, Task, TaskContext, load_task
from .transport import GossipClient, PeerRefusal, PeerUnreachable, make_app

log = logging.getLogger(__name__)

T = TypeVar("T")


class Notifier(Protocol):
    """What the node tells a service manager (``gossipfl.notify.Notifier``)."""

    watchdog_interval_s: float | None

    def ready(self, status: str | None = None) -> object: ...

    def status(self, text: str) -> object: ...

    def watchdog(self) -> object: ...

    def stopping(self, status: str | None = None) -> object: ...

STATUS_SCHEMA = 1
REFUSAL_LOG_LIMIT = 1  # refusals of one (peer, reason) logged at WARNING, then DEBUG
MAX_STRANGERS = 64  # non-members remembered for status
FINISHED_EVAL_S = 1.0  # how often a finished node re-scores a model peers changed


class Node:
    """One gossipfl node; ``run()`` serves until ``stop()``."""

    def __init__(self, config: Config, identity: Identity | None = None,
                 task: Task | None = None) -> None:
        self.config = config
        state_dir = config.node.state_dir
        if identity is None:
            identity, made = load_or_create_identity(state_dir)
            if made:
                log.info("new identity %s made in %s", identity.short_id, state_dir)
        self.identity = identity
        t = config.task
        self.task = task or load_task(t.name, TaskContext(
            t.shard_index, t.shard_count, t.seed, t.alpha, t.data, t.batch_size, t.lr,
            t.hidden, dict(t.options)))
        self.flat = FlatModel(self.task.make_model(), self.task.describe())
        g = config.gossip
        self.spec = CompressionSpec.from_name(g.compression, g.topk_fraction,
                                              g.block_size)
        self.merge_path, merge = select_merge()
        self.max_bytes = g.max_message_bytes or max_message_bytes(self.flat.dim)
        self.engine = GossipEngine(identity, self.flat.vector, self.flat.vector,
                                   self.flat.manifest, self.spec, g.consensus_step,
                                   merge, max_edges=g.max_edges,
                                   max_bytes=self.max_bytes)
        self.peers = PeerSet()
        for entry in config.peers:
            self.peers.allow([entry.public_key])
            self.peers.upsert(entry.public_key, entry.address, "static", entry.name)
        self.checkpoint_path = state_dir / checkpoint.CHECKPOINT_FILE
        self.model_lock = asyncio.Lock()
        self.rng = random.Random(int.from_bytes(identity.public_key[:8], "little"))
        self.accuracy: float | None = None
        self.loss: float | None = None
        self.started = time.time()
        self.last_round_at = 0.0
        self.last_checkpoint_at = 0.0
        self.refused: dict[str, int] = {}
        self._refusals_logged: dict[tuple[bytes, str], int] = {}  # bounded
        self.strangers: dict[str, dict[str, Any]] = {}
        self.duplicate_identity: list[str] = []
        self.state = "starting"
        self._in_flight: dict[bytes, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.listen_port = 0
        # Hooks for the mesh layer (gossipfl.up): more routes on the gossip server,
        # more fields in status, per peer and for the node.
        self.extra_routes: list[tuple[str, str, Callable[[web.Request],
                                                         Awaitable[web.Response]]]] = []
        self.extra_status: list[Callable[[], dict[str, Any]]] = []
        self.peer_status: list[Callable[[bytes], dict[str, Any]]] = []

    # --- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Restore state and open both servers; returns once they listen."""
        if checkpoint.restore(self.checkpoint_path, self.engine):
            log.info("resumed from %s at round %d", self.checkpoint_path,
                     self.engine.round)
        log.info("node %s (%s) up: task %s, %d parameters, compression %s, merge "
                 "path %s", self.identity.short_id, self.config.node.name,
                 self.task.name, self.flat.dim, self.config.gossip.compression,
                 self.merge_path)
        host, port = parse_listen(self.config.node.listen)
        gossip_app = make_app(self.handle_exchange, self.max_bytes, self.edge_epoch,
                              self._note_refusal)
        for method, route, handler in self.extra_routes:
            gossip_app.router.add_route(method, route, handler)
        runner = web.AppRunner(gossip_app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._cleanup_runners()
            raise ConfigError(f"cannot listen on {self.config.node.listen} "
                              f"(node.listen): {exc.strerror or exc}") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.listen_port = sockets[0].getsockname()[1] if sockets else port
        await self._start_control()
        self.accuracy = await asyncio.to_thread(self.task.evaluate, self.flat.model)
        self.state = "running"

    async def _start_control(self) -> None:
        path = self.config.control_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        app = web.Application()
        app.router.add_get("/v1/status", self._status_handler)
        app.router.add_get("/v1/model", self._model_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:
            await self._cleanup_runners()
            raise StateError(f"cannot open the control socket {path} ({len(str(path))}"
                             f" bytes; unix sockets allow 107): "
                             f"{exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)

    async def run(self, notifier: Notifier | None = None) -> None:
        """Start, gossip until stopped, then checkpoint and close."""
        await self.start()
        if notifier is not None:
            notifier.ready()
        try:
            await self.serve_rounds(notifier)
        finally:
            await self.close()

    async def serve_rounds(self, notifier: Notifier | None = None) -> None:
        """Run rounds (and keep a service manager informed) until ``stop()``."""
        client = GossipClient(self.max_bytes, self.config.gossip.exchange_timeout_s)
        async with client:
            tasks = [asyncio.create_task(self._round_loop(client))]
            if notifier is not None:
                tasks.append(asyncio.create_task(self._keep_informed(notifier)))
            await self._stopping.wait()
            if notifier is not None:
                notifier.stopping()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in list(self._in_flight.values()):
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def _keep_informed(self, notifier: Notifier) -> None:
        """STATUS lines, and WATCHDOG pings only while gossip makes progress."""
        interval = notifier.watchdog_interval_s or 10.0
        last = (-1, -1)
        while True:
            live = len(self.peers.live())
            exchanges = sum(c.exchanges for c in list(self.engine.counts.values()))
            notifier.status(f"round {self.engine.round}, {live} live peer(s), "
                            f"{exchanges} exchanges, accuracy "
                            f"{(self.accuracy or 0.0):.3f}")
            now = (self.engine.round, exchanges)
            finished = self.state == "finished"
            if now != last or finished or not self.peers.peers:
                notifier.watchdog()
            last = now
            await asyncio.sleep(interval / 2)

    def stop(self) -> None:
        self.state = "stopping"
        self._stopping.set()

    async def close(self) -> None:
        await self.locked(self._checkpoint)
        await self._cleanup_runners()
        with contextlib.suppress(FileNotFoundError):
            self.config.control_socket.unlink()
        log.info("node %s stopped at round %d", self.identity.short_id,
                 self.engine.round)

    async def _cleanup_runners(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    def _checkpoint(self) -> None:
        size = checkpoint.save(self.checkpoint_path, self.engine)
        self.last_checkpoint_at = time.time()
        log.debug("checkpoint of %d bytes written at round %d", size,
                  self.engine.round)

    # --- rounds ---------------------------------------------------------------------

    async def _round_loop(self, client: GossipClient) -> None:
        g = self.config.gossip
        settled = 0
        while True:
            began = time.monotonic()
            if g.max_rounds == 0 or self.engine.round < g.max_rounds:
                self.loss = await self.locked(self.task.train, self.flat.model,
                                              g.local_steps, self.engine.round)
                self.engine.round += 1
                if self.engine.round % g.eval_interval_rounds == 0:
                    self.accuracy = await self.locked(self.task.evaluate,
                                                      self.flat.model)
            elif settled < g.settle_rounds:
                # Training is over: gossip only, so the last local steps are
                # averaged out before the node calls itself finished.
                settled += 1
                self.accuracy = await self.locked(self.task.evaluate, self.flat.model)
            else:
                break
            self.last_round_at = time.time()
            for peer in self.peers.pick(g.fanout, set(self._in_flight), self.rng,
                                        self._neighbourhood()):
                task = asyncio.create_task(self._exchange(client, peer.public_key,
                                                          peer.address))
                self._in_flight[peer.public_key] = task
            if self._in_flight:
                await asyncio.wait(list(self._in_flight.values()),
                                   timeout=max(0.05, g.round_interval_s))
            if time.time() - self.last_checkpoint_at >= g.checkpoint_interval_s:
                await self.locked(self._checkpoint)
            rest = g.round_interval_s - (time.monotonic() - began)
            await asyncio.sleep(max(rest, 0.0))
        self.accuracy = await self.locked(self.task.evaluate, self.flat.model)
        self.state = "finished"
        log.info("finished %d rounds, accuracy %.3f; serving peers until stopped",
                 self.engine.round, self.accuracy or 0.0)
        # Peers still merge into this model: keep its accuracy current.
        version = self.engine.model_version
        await self.locked(self._checkpoint)
        while True:
            await asyncio.sleep(FINISHED_EVAL_S)
            if self.engine.model_version != version:
                version = self.engine.model_version
                self.accuracy = await self.locked(self.task.evaluate, self.flat.model)
                if time.time() - self.last_checkpoint_at >= g.checkpoint_interval_s:
                    await self.locked(self._checkpoint)

    def _neighbourhood(self) -> set[bytes] | None:
        """Once ``max_edges`` edges exist, keep gossiping over those.

        A new edge starts from x0 and an evicted one restarts with a dense reset;
        in a fleet larger than ``max_edges`` picking among all peers would churn
        edges and pay for it in bytes. Sticking to a stable neighbourhood keeps the
        graph connected through the neighbours' own neighbourhoods.
        """
        edges = self.engine.edges
        if len(edges) < self.config.gossip.max_edges:
            return None
        return set(edges)

    async def _exchange(self, client: GossipClient, peer: bytes, address: str) -> None:
        try:
            pending = await self.locked(self.engine.start, peer)
            if pending is None:
                return
            await self._complete(client, pending, address)
        finally:
            self._in_flight.pop(peer, None)

    async def _complete(self, client: GossipClient, pending: Pending,
                        address: str) -> None:
        peer = pending.peer
        try:
            reply = await client.exchange(address, pending.request)
        except PeerUnreachable as exc:
            self.engine.abort(pending, None)
            delay = self.peers.failed(peer, str(exc))
            log.info("%s unreachable (%s); backing off %.0f s", short_id(peer), exc,
                     delay)
            return
        except PeerRefusal as exc:
            self.engine.abort(pending, exc, exc.epoch)
            if exc.reason == "edge-busy":
                log.debug("%s edge busy; trying another peer next round",
                          short_id(peer))
            else:
                log.info("%s refused our message: %s: %s", short_id(peer),
                         exc.reason, exc.detail)
                self.peers.failed(peer, exc.reason)
            return
        except asyncio.CancelledError:
            self.engine.abort(pending, None)
            raise
        try:
            await self.locked(self.engine.finish, pending, reply)
        except MessageRefused as exc:
            self._note_refusal(peer, address, exc)
            self.peers.failed(peer, exc.reason)
            return
        self.peers.succeeded(peer)

    # --- serving ------------------------------------------------------------------

    async def handle_exchange(self, body: bytes, remote: str) -> bytes:
        header = await asyncio.to_thread(self.engine.check_request, body,
                                         self.peers.is_member)
        reply: bytes = await self.locked(self.engine.respond, body,
                                         self.peers.is_member, header)
        # The request verified: the peer is alive and in step, whatever our own
        # attempts to reach it said.
        self.peers.succeeded(bytes(body[8:40]))
        return reply

    async def locked(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, holding the model lock throughout.

        If the caller is cancelled meanwhile, the lock is still held until the
        thread has finished: cancellation never lets two writers at the model.
        """
        async with self.model_lock:
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await work
                raise

    def edge_epoch(self, peer: bytes) -> int | None:
        edge = self.engine.edges.get(peer)
        return None if edge is None else edge.epoch

    def _note_refusal(self, claimed: bytes, remote: str, exc: MessageRefused) -> None:
        who = short_id(claimed) if claimed else "?"
        if exc.reason == "edge-busy":  # two ends started at once: not a fault
            log.debug("%s (%s) edge busy; it will retry", who, remote)
            return
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        if claimed and exc.verified and self.peers.is_member(claimed):
            self.engine.refused(claimed, exc.reason)
        elif claimed and exc.reason == "unknown-sender" and (
                claimed.hex() in self.strangers or len(self.strangers) < MAX_STRANGERS):
            entry = self.strangers.setdefault(claimed.hex(), {
                "id": claimed.hex(), "address": remote, "messages": 0,
                "reason": exc.reason})
            entry["messages"] += 1
        if exc.reason == "own-identity" and remote not in self.duplicate_identity:
            self.duplicate_identity.append(remote)
            log.error("another node at %s uses this node's identity %s; give each "
                      "box its own key ('gossipfl init')", remote,
                      self.identity.short_id)
        # What a peer can trigger is logged at WARNING once per (source, reason),
        # then at DEBUG; the memory for that is bounded. The source is the signer
        # when the signature verified, else the remote host (the claimed key is
        # anyone's to forge).
        host = remote.rsplit(":", 1)[0] if remote.count(":") == 1 else remote
        key = (claimed if exc.verified else host.encode(), exc.reason)
        if key not in self._refusals_logged and len(self._refusals_logged) >= 4096:
            self._refusals_logged.clear()
        seen = self._refusals_logged.get(key, 0) + 1
        self._refusals_logged[key] = seen
        level = logging.WARNING if seen <= REFUSAL_LOG_LIMIT else logging.DEBUG
        log.log(level, "%s (%s) message refused: %s: %s", who, remote, exc.reason,
                exc.detail)

    # --- control ------------------------------------------------------------------

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _model_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.model.tobytes(),
                            content_type="application/octet-stream")

    def status(self) -> dict[str, Any]:
        now = time.time()
        g = self.config.gossip
        peers = []
        for key, peer in self.peers.peers.items():
            counts = self.engine.counts_for(key)
            peers.append({
                "id": key.hex(), "short_id": short_id(key), "name": peer.name,
                "address": peer.address, "sources": sorted(peer.sources),
                "last_exchange": counts.last_exchange or None,
                "exchanges": counts.exchanges, "bytes_in": counts.bytes_in,
                "bytes_out": counts.bytes_out, "peer_round": counts.last_round,
                "failures": peer.failures, "last_error": peer.last_error or None,
                "refused": dict(counts.refused),
                "state": "backoff" if peer.backoff_until > time.monotonic()
                else "live",
            })
            for more in self.peer_status:
                peers[-1].update(more(key))
        # Worker threads may add entries meanwhile: work on a copy (one C-level
        # call under the GIL).
        all_counts = list(self.engine.counts.values())
        problems = self._problems(now, peers)
        status: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "version": __version__,
            "node": {"id": self.identity.node_id, "short_id": self.identity.short_id,
                     "name": self.config.node.name, "pid": os.getpid(),
                     "listen": self.config.node.listen, "port": self.listen_port},
            "state": self.state,
            "round": self.engine.round,
            "max_rounds": g.max_rounds,
            "model_version": self.engine.model_version,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "task": self.task.name,
            "parameters": self.flat.dim,
            "manifest": self.flat.manifest.hex(),
            "compression": g.compression,
            "merge_path": self.merge_path,
            "bytes_sent": sum(c.bytes_out for c in all_counts),
            "bytes_received": sum(c.bytes_in for c in all_counts),
            "dense_equivalent_sent": sum(c.dense_equivalent_out for c in all_counts),
            "exchanges": sum(c.exchanges for c in all_counts),
            "peers": peers,
            "refused": dict(self.refused),
            "strangers": list(self.strangers.values()),
            "duplicate_identity": list(self.duplicate_identity),
            "uptime_s": round(now - self.started, 3),
            "last_round_at": self.last_round_at or None,
            "last_checkpoint_at": self.last_checkpoint_at or None,
            "healthy": not problems,
            "problems": problems,
        }
        for extra in self.extra_status:
            status.update(extra())
        return status

    def _problems(self, now: float, peers: list[dict[str, Any]]) -> list[str]:
        g = self.config.gossip
        problems = []
        if self.duplicate_identity:
            problems.append("another node uses this node's identity")
        if not peers:
            problems.append("no peers")
        elif not any(p["state"] == "live" for p in peers):
            problems.append("every peer is backed off")
        last = max((p["last_exchange"] or 0 for p in peers), default=0)
        if peers and self.state == "running" and now - max(last, self.started) > \
                g.stale_after_s:
            problems.append(f"no exchange for more than {g.stale_after_s:g} s")
        return problems


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(node: Node, notifier: Notifier | None = None) -> None:
    """Run ``node`` until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    await node.run(notifier)


def event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """``asyncio.run`` on uvloop when it is installed (0.17 has no ``uvloop.run``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run


def run_daemon(config: Config) -> int:
    """Entry point of ``gossipfl daemon``: returns the process exit code."""
    configure_logging(config.node.log_level)
    torch.set_num_threads(1)

    async def main() -> None:
        await serve(Node(config), SdNotifier.from_environ())

    try:
        event_loop_runner()(main())
    except GossipflError as exc:
        log.error("%s", exc)
        return 2
    return 0
