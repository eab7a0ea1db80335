"""A real node in this process, spoken to over real sockets: hostile messages,
status during a merge, and a hung peer that must not stall the rounds."""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from gossipfl.codec import HEADER_BYTES, Kind, encode_message
from gossipfl.compress import Codec, CompressionSpec, compress
from gossipfl.config import Config, config_from_dict
from gossipfl.control import fetch_status
from gossipfl.identity import Identity
from gossipfl.node import Node
from gossipfl.transport import EXCHANGE_PATH

KEYS = [Identity.from_seed(bytes([i + 7]) * 32) for i in range(4)]


def config(tmp: Path, index: int, peers: dict[int, str], **gossip: Any) -> Config:
    raw = {
        "node": {"name": f"n{index}", "state_dir": str(tmp / f"n{index}"),
                 "listen": "127.0.0.1:0"},
        "task": {"name": "digits", "shard_index": index, "shard_count": 4},
        "gossip": {"checkpoint_interval_s": 3600.0, **gossip},
        "peers": [{"public_key": KEYS[j].public_key.hex(), "address": address,
                   "name": f"n{j}"} for j, address in peers.items()],
    }
    return config_from_dict(raw, tmp)


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


async def post(port: int, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}{EXCHANGE_PATH}", data=body) as response:
        return response.status, await response.read()


def resign(data: bytes | bytearray, identity: Identity) -> bytes:
    body = bytes(data[:-64])
    return body + identity.sign(body)


def dense_request(victim: Node, sender: Identity, values: np.ndarray,
                  manifest: bytes | None = None) -> bytes:
    out = compress(values.astype(np.float32), CompressionSpec(Codec.DENSE_F32),
                   np.random.default_rng(0))
    return encode_message(sender, out, kind=Kind.REQUEST,
                          receiver=victim.identity.public_key, round=1, epoch=0,
                          seq=0, manifest=manifest or victim.flat.manifest)


def attack(name: str, victim: Node, attacker: Node) -> bytes:
    dim = victim.flat.dim
    if name in ("nan", "inf"):
        values = np.zeros(dim)
        values[5] = np.nan if name == "nan" else np.inf
        return dense_request(victim, KEYS[1], values)
    if name == "wrong-shape":
        return dense_request(victim, KEYS[1], np.zeros(dim + 10),
                             manifest=b"\x05" * 16)
    pending = attacker.engine.start(victim.identity.public_key)
    assert pending is not None
    good = pending.request
    if name == "wrong-length":
        return resign(good[:-64] + b"\0\0\0\0" + good[-64:], KEYS[1])
    if name == "bad-signature":
        bad = bytearray(good)
        bad[HEADER_BYTES + 1] ^= 0x40
        return bytes(bad)
    if name == "oversized":
        return good + b"\0" * (victim.max_bytes + 1)
    if name == "unknown-sender":
        stranger = Identity.from_seed(b"\x99" * 32)
        raw = bytearray(good)
        raw[8:40] = stranger.public_key
        return resign(raw, stranger)
    if name == "non-canonical-count":
        raw = bytearray(good)
        struct.pack_into("<I", raw, 108, struct.unpack_from("<I", raw, 108)[0] + 1)
        return resign(raw, KEYS[1])
    raise AssertionError(name)


CASES = {"nan": (400, "non-finite"), "inf": (400, "non-finite"),
         "wrong-shape": (400, "manifest-mismatch"), "wrong-length": (400, "malformed"),
         "bad-signature": (403, "bad-signature"), "oversized": (413, "oversized"),
         "unknown-sender": (403, "unknown-sender"),
         "non-canonical-count": (400, "malformed")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_message_is_refused_logged_and_changes_nothing(
        name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    want_status, want_reason = CASES[name]

    async def body() -> None:
        victim = Node(config(tmp_path, 0, {1: "http://127.0.0.1:9"}), KEYS[0])
        attacker = Node(config(tmp_path, 1, {0: "http://127.0.0.1:9"}), KEYS[1])
        await victim.start()
        try:
            before = victim.engine.model.tobytes()
            edges_before = {k: (e.epoch, e.seq, e.mine.tobytes(), e.theirs.tobytes())
                            for k, e in victim.engine.edges.items()}
            with caplog.at_level(logging.WARNING, logger="gossipfl"):
                status, reply = await post(victim.listen_port,
                                           attack(name, victim, attacker))
            assert status == want_status, reply
            assert want_reason.encode() in reply
            assert victim.engine.model.tobytes() == before
            assert {k: (e.epoch, e.seq, e.mine.tobytes(), e.theirs.tobytes())
                    for k, e in victim.engine.edges.items()
                    if k in edges_before} == edges_before
            assert victim.refused.get(want_reason) == 1
            lines = [r.getMessage() for r in caplog.records]
            claimed = "?" if name == "oversized" else None
            assert any(want_reason in line and
                       (claimed or KEYS[1].short_id if name != "unknown-sender"
                        else "") in line for line in lines), lines
        finally:
            await victim.close()

    run(body)


def test_a_replayed_round_is_refused_with_409_and_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        victim = Node(config(tmp_path, 0, {1: "http://127.0.0.1:9"}), KEYS[0])
        attacker = Node(config(tmp_path, 1, {0: "http://127.0.0.1:9"}), KEYS[1])
        await victim.start()
        try:
            pending = attacker.engine.start(victim.identity.public_key)
            assert pending is not None
            status, reply = await post(victim.listen_port, pending.request)
            assert status == 200
            attacker.engine.finish(pending, reply)
            before = victim.engine.model.tobytes()
            with caplog.at_level(logging.WARNING, logger="gossipfl"):
                status, reply = await post(victim.listen_port, pending.request)
            assert status == 409 and b"replay" in reply
            assert victim.engine.model.tobytes() == before
            assert any("replay" in r.getMessage() and KEYS[1].short_id in
                       r.getMessage() for r in caplog.records)
            status_doc = victim.status()
            peer = next(p for p in status_doc["peers"] if p["name"] == "n1")
            assert peer["refused"] == {"replay": 1}
            assert peer["exchanges"] == 1
        finally:
            await victim.close()

    run(body)


def test_status_answers_while_a_merge_runs(tmp_path: Path) -> None:
    async def body() -> None:
        victim = Node(config(tmp_path, 0, {1: "http://127.0.0.1:9"}), KEYS[0])
        attacker = Node(config(tmp_path, 1, {0: "http://127.0.0.1:9"}), KEYS[1])
        entered, release = threading.Event(), threading.Event()
        real_merge = victim.engine.merge

        def slow_merge(*args: Any) -> None:
            entered.set()
            release.wait(30)
            real_merge(*args)

        victim.engine.merge = slow_merge
        await victim.start()
        try:
            pending = attacker.engine.start(victim.identity.public_key)
            assert pending is not None
            request = asyncio.create_task(post(victim.listen_port, pending.request))
            assert await asyncio.to_thread(entered.wait, 10)
            status = await fetch_status(victim.config.control_socket, timeout_s=5)
            assert status["schema"] == 1 and status["node"]["name"] == "n0"
            assert not request.done()
            release.set()
            code, _ = await request
            assert code == 200
        finally:
            release.set()
            await victim.close()

    run(body)


class HungServer:
    """Accepts connections, reads, and never answers."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.read(1 << 20)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_a_hung_peer_does_not_stall_the_rounds_or_the_other_peers(
        tmp_path: Path) -> None:
    async def body() -> None:
        server = HungServer()
        hung_port = await server.start()
        hung = f"http://127.0.0.1:{hung_port}"
        a = Node(config(tmp_path, 0, {2: hung}, exchange_timeout_s=20.0,
                        round_interval_s=0.02), KEYS[0])
        await a.start()
        b = Node(config(tmp_path, 1, {0: f"http://127.0.0.1:{a.listen_port}",
                                      2: hung}, exchange_timeout_s=20.0,
                        round_interval_s=0.02), KEYS[1])
        a.peers.allow([KEYS[1].public_key])
        await b.start()
        a.peers.upsert(KEYS[1].public_key, f"http://127.0.0.1:{b.listen_port}",
                       "static", "n1")
        client_tasks = []
        from gossipfl.transport import GossipClient

        for node in (a, b):
            client = GossipClient(node.max_bytes, 20.0)
            await client.__aenter__()
            client_tasks.append((client, asyncio.create_task(
                node._round_loop(client))))
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:
                done = a.engine.counts_for(KEYS[1].public_key).exchanges
                if a.engine.round >= 60 and b.engine.round >= 60 and done >= 10:
                    break
                await asyncio.sleep(0.1)
            # the hung peer still holds its exchange open, the rounds went on
            assert KEYS[2].public_key in a._in_flight
            assert a.engine.round >= 60 and b.engine.round >= 60
            assert a.engine.counts_for(KEYS[1].public_key).exchanges >= 10
        finally:
            for _, task in client_tasks:
                task.cancel()
            for node in (a, b):
                for t in list(node._in_flight.values()):
                    t.cancel()
                await asyncio.gather(*node._in_flight.values(),
                                     return_exceptions=True)
            for client, task in client_tasks:
                await asyncio.gather(task, return_exceptions=True)
                await client.__aexit__()
            await a.close()
            await b.close()
            await server.close()

    run(body)


def test_a_client_that_vanishes_mid_body_leaves_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        victim = Node(config(tmp_path, 0, {1: "http://127.0.0.1:9"}), KEYS[0])
        await victim.start()
        try:
            with caplog.at_level(logging.DEBUG):
                for _ in range(5):
                    _, writer = await asyncio.open_connection("127.0.0.1",
                                                              victim.listen_port)
                    writer.write(b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 5000\r\n\r\n" + b"G" * 100)
                    await writer.drain()
                    writer.close()
                await asyncio.sleep(0.5)
                # the node still answers
                status = await fetch_status(victim.config.control_socket)
                assert status["state"] == "running"
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        finally:
            await victim.close()

    run(body)


def test_a_forged_request_learns_no_edge_epoch(tmp_path: Path) -> None:
    async def body() -> None:
        victim = Node(config(tmp_path, 0, {1: "http://127.0.0.1:9"}), KEYS[0])
        attacker = Node(config(tmp_path, 1, {0: "http://127.0.0.1:9"}), KEYS[1])
        await victim.start()
        try:
            status, reply = await post(victim.listen_port,
                                       attack("bad-signature", victim, attacker))
            assert status == 403 and b"epoch" not in reply
            peer = next(p for p in victim.status()["peers"] if p["name"] == "n1")
            assert peer["refused"] == {}  # not held against the member it names
        finally:
            await victim.close()

    run(body)
