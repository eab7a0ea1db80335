"""The peer set: membership, sources, back-off and picking."""

import random

import pytest

from gossipfl.peers import BACKOFF_MAX_S, PeerSet

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def peers(clock: Clock | None = None) -> PeerSet:
    ps = PeerSet(clock or Clock())
    ps.allow([A, B, C])
    for key in (A, B, C):
        ps.upsert(key, f"http://{key[:1].decode()}", "static")
    return ps


def test_a_stranger_is_never_a_peer() -> None:
    with pytest.raises(KeyError):
        PeerSet().upsert(b"s" * 32, "http://x", "mdns")


def test_a_peer_leaves_when_its_last_source_does() -> None:
    ps = peers()
    ps.upsert(A, "http://a", "mdns")
    ps.forget(A, "static")
    assert A in ps.peers
    ps.forget(A, "mdns")
    assert A not in ps.peers


def test_failures_back_off_exponentially_up_to_a_cap_and_success_clears() -> None:
    clock = Clock()
    ps = peers(clock)
    delays = [ps.failed(A, "reset") for _ in range(8)]
    assert delays[:3] == [1.0, 2.0, 4.0] and delays[-1] == BACKOFF_MAX_S
    assert A not in {p.public_key for p in ps.live()}
    clock.now += BACKOFF_MAX_S
    assert A in {p.public_key for p in ps.live()}
    ps.failed(A, "reset")
    ps.succeeded(A)
    assert A in {p.public_key for p in ps.live()} and ps.peers[A].failures == 0


def test_pick_skips_busy_peers_and_prefers_the_neighbourhood() -> None:
    ps = peers()
    rng = random.Random(0)
    for _ in range(20):
        assert [p.public_key for p in ps.pick(1, {A, B}, rng)] == [C]
        assert [p.public_key for p in ps.pick(1, set(), rng, {B})] == [B]
    # a neighbourhood with nobody ready falls back to everyone ready
    assert ps.pick(1, {B}, rng, {B})[0].public_key in (A, C)
