"""The live peer set: who this node may gossip with right now, and how it is doing.

Peers enter from several sources (the config's static list today; mDNS discovery,
seeds and signed endpoint records feed the same ``upsert``/``forget`` calls). A peer
that fails an exchange is backed off exponentially, so a dead or hung box costs one
timeout and is then skipped until its back-off ends; the rest of the mesh goes on.

Event-loop only: not thread safe, no locking.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


@dataclass
class Peer:
    public_key: bytes
    address: str
    name: str = ""
    sources: set[str] = field(default_factory=set)
    failures: int = 0
    backoff_until: float = 0.0
    last_error: str = ""
    last_ok: float = 0.0


class PeerSet:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.peers: dict[bytes, Peer] = {}
        self.members: set[bytes] = set()

    def allow(self, keys: Iterable[bytes]) -> None:
        """Add public keys to the membership allowlist."""
        self.members.update(keys)

    def is_member(self, key: bytes) -> bool:
        return key in self.members

    def upsert(self, key: bytes, address: str, source: str, name: str = "") -> Peer:
        """Add or refresh a peer; members only (a stranger is never a peer)."""
        if key not in self.members:
            raise KeyError(f"{key.hex()[:8]} is not a member")
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = Peer(key, address, name)
        peer.address, peer.name = address, name or peer.name
        peer.sources.add(source)
        return peer

    def forget(self, key: bytes, source: str) -> None:
        """Drop one source of a peer; the peer leaves when none is left."""
        peer = self.peers.get(key)
        if peer is None:
            return
        peer.sources.discard(source)
        if not peer.sources:
            del self.peers[key]

    def live(self) -> list[Peer]:
        now = self.clock()
        return [p for p in self.peers.values() if p.backoff_until <= now]

    def pick(self, count: int, busy: set[bytes], rng: random.Random,
             within: set[bytes] | None = None) -> list[Peer]:
        """Up to ``count`` live peers chosen uniformly, skipping ``busy`` ones.

        ``within`` limits the choice to those keys when any of them is ready.
        """
        ready = [p for p in self.live() if p.public_key not in busy]
        if within is not None:
            preferred = [p for p in ready if p.public_key in within]
            ready = preferred or ready
        return rng.sample(ready, min(count, len(ready)))

    def succeeded(self, key: bytes) -> None:
        peer = self.peers.get(key)
        if peer is not None:
            peer.failures, peer.backoff_until = 0, 0.0
            peer.last_ok, peer.last_error = self.clock(), ""

    def failed(self, key: bytes, error: str) -> float:
        """Back the peer off; returns the back-off in seconds."""
        peer = self.peers.get(key)
        if peer is None:
            return 0.0
        peer.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (peer.failures - 1))
        peer.backoff_until = self.clock() + delay
        peer.last_error = error
        return delay
