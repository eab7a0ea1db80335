"""HTTP between peers: one endpoint, ``POST /v1/exchange``, bytes in and bytes out.

The transport knows nothing of models. The server caps the body size before reading
it (from Content-Length, and again while streaming), hands the bytes to the node's
handler, and turns a ``MessageRefused`` into a 4xx with a small JSON body
``{"reason": ..., "detail": ..., "epoch": ...}``. The client does the same in reverse:
a capped read of the reply, timeouts on connect and on the whole exchange, and
``MessageRefused`` or ``PeerUnreachable`` raised for the caller to act on.

Inside a mesh the server listens on the WireGuard address only, so every byte that
reaches it came through the encrypted tunnel; messages are signed as well, so the
transport itself needs no TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .errors import GossipflError, MessageRefused

log = logging.getLogger(__name__)

EXCHANGE_PATH = "/v1/exchange"
CONTENT_TYPE = "application/octet-stream"
CONNECT_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this
MAX_CONCURRENT_REQUESTS = 32  # more at once are answered 503

# Which HTTP status a refusal travels with.
STATUS = {
    "oversized": 413,
    "replay": 409,
    "out-of-sync": 409,
    "edge-busy": 409,
    "unknown-sender": 403,
    "bad-signature": 403,
    "own-identity": 403,
    "not-for-us": 403,
    "slow-body": 408,
}

Handler = Callable[[bytes, str], Awaitable[bytes]]
RefusalHook = Callable[[bytes, str, MessageRefused], None]


class PeerUnreachable(GossipflError):
    """The peer did not answer (refused connection, reset, timeout)."""


def refusal_response(exc: MessageRefused, epoch: int | None = None) -> web.Response:
    body: dict[str, object] = {"reason": exc.reason, "detail": exc.detail}
    if epoch is not None:
        body["epoch"] = epoch
    return web.json_response(body, status=STATUS.get(exc.reason, 400))


def make_app(handler: Handler, max_bytes: int,
             edge_epoch: Callable[[bytes], int | None],
             on_refusal: RefusalHook) -> web.Application:
    """The gossip server app; ``handler(body, remote)`` returns the reply bytes.

    Every refusal, the transport's own (size) and the handler's, is reported to
    ``on_refusal(claimed_sender, remote, error)`` before the 4xx goes out; the
    claimed sender is unverified and empty when the body is too short to say.
    """

    slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

    async def exchange(request: web.Request) -> web.StreamResponse:
        remote = request.remote or "?"
        if slots.locked():
            return web.json_response({"reason": "busy", "detail": "too many "
                                      "requests in progress; retry later"},
                                     status=503)
        async with slots:
            body: bytes | None = None
            try:
                body = await read_body(request, max_bytes)
                reply = await handler(body, remote)
            except MessageRefused as exc:
                sender = body_sender(body)
                on_refusal(sender or b"", remote, exc)
                # Our edge epoch goes only to the member that signed the request.
                hint = edge_epoch(sender) if sender and exc.verified else None
                return refusal_response(exc, hint)
            except ClientGone:
                return web.Response(status=400)
            return web.Response(body=reply, content_type=CONTENT_TYPE)

    app = web.Application(client_max_size=max_bytes)
    app.router.add_post(EXCHANGE_PATH, exchange)
    return app


def body_sender(body: bytes | None) -> bytes | None:
    """The sender key a message claims (unverified), for the refusal's epoch hint."""
    from .codec import HEADER_BYTES  # local: the codec is not a transport concern

    if body is None or len(body) < HEADER_BYTES:
        return None
    return bytes(body[8:40])


class ClientGone(Exception):
    """The client went away in the middle of its request body."""


async def read_body(request: web.Request, max_bytes: int,
                    timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole request body: size capped, time capped, before anything parses it."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise MessageRefused("oversized", f"body of {length} bytes exceeds max "
                             f"{max_bytes}")
    try:
        return await asyncio.wait_for(read_capped(request.content, max_bytes),
                                      timeout_s)
    except TimeoutError:
        raise MessageRefused("slow-body", f"body not received within {timeout_s:g} "
                             "s") from None
    except (OSError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
        raise ClientGone() from None


async def read_capped(stream: aiohttp.StreamReader, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in stream.iter_chunked(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise MessageRefused("oversized", f"body exceeds max {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class GossipClient:
    """Posts requests to peers; one pooled session per node."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout_s,
                                             connect=min(CONNECT_TIMEOUT_S, timeout_s))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GossipClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def exchange(self, address: str, body: bytes) -> bytes:
        """The peer's reply; raises PeerRefusal (with ``epoch``) or PeerUnreachable."""
        if self._session is None:
            raise RuntimeError("GossipClient used outside 'async with'")
        try:
            async with self._session.post(address + EXCHANGE_PATH, data=body,
                                          headers={"Content-Type": CONTENT_TYPE}
                                          ) as response:
                if response.status == 200:
                    return await read_capped(response.content, self.max_bytes)
                raise await refusal_from(response)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"{address}: {type(exc).__name__}: {exc}") from None


class PeerRefusal(MessageRefused):
    """A refusal the peer sent back; ``epoch`` is its edge epoch when it gave one."""

    def __init__(self, reason: str, detail: str, epoch: int | None) -> None:
        super().__init__(reason, detail)
        self.epoch = epoch


async def refusal_from(response: aiohttp.ClientResponse) -> PeerRefusal:
    text = (await response.content.read(4096)).decode("utf-8", "replace")
    try:
        body = json.loads(text)
        reason = str(body["reason"])[:64]
        detail = str(body.get("detail", ""))[:512]
        epoch = body.get("epoch")
        valid = isinstance(epoch, int) and 0 <= epoch < 2**32
        epoch = epoch if valid else None
    except (ValueError, KeyError, TypeError):
        return PeerRefusal("http-error", f"HTTP {response.status}: {text[:200]}", None)
    return PeerRefusal(reason, detail, epoch)
