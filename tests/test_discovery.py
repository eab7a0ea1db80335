"""Discovery logic without the network: TXT parsing, tracker, seeds, records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
from nacl.signing import SigningKey

from gossipfl import discovery as dm
from gossipfl import membership as mb
from gossipfl.errors import ConfigError, DecodeError, MessageRefused
from gossipfl.identity import Identity

NOW = 1_700_000_000.0
TAG = "0123abcd"


@dataclass
class FakeSink:
    seen: list[dm.DiscoveredPeer] = field(default_factory=list)
    lost: list[bytes] = field(default_factory=list)
    strangers: list[tuple[bytes, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def peer_seen(self, peer: dm.DiscoveredPeer) -> None:
        self.seen.append(peer)

    def peer_lost(self, public_key: bytes) -> None:
        self.lost.append(public_key)

    def stranger_seen(self, public_key: bytes, why: str, address: str = "") -> None:
        self.strangers.append((public_key, why))

    def duplicate_identity(self, address: str) -> None:
        self.duplicates.append(address)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _member(mesh: SigningKey, name: str = "n") -> tuple[Identity, mb.Membership]:
    node = Identity.generate()
    cert = mb.issue_certificate(mesh, node.public_key, name, int(NOW) - 10)
    return node, mb.Membership(bytes(mesh.verify_key), cert)


def _props(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


class World:
    """Us, a mesh, a sink and a tracker with a fake clock."""

    def __init__(self, grace_s: float = 30.0) -> None:
        self.mesh = SigningKey.generate()
        self.me, self.my_membership = _member(self.mesh, "me")
        self.sink = FakeSink()
        self.clock = FakeClock()
        self.tracker = dm.PeerTracker(
            self.me,
            self.my_membership,
            self.sink,
            TAG,
            grace_s,
            self.clock,
            lambda: NOW,
        )
        self.tracker.own_addresses = {"198.51.100.10"}

    def advert(
        self, node: Identity, membership: mb.Membership, tag: str = "feedf00d"
    ) -> dict[bytes, bytes | None]:
        return _props(dm.build_txt(node, membership, 51820, 8080, tag))


def test_member_is_seen_with_its_endpoint_and_certificate() -> None:
    w = World()
    peer, membership = _member(w.mesh, "peer-1")

    w.tracker.service_updated("a", w.advert(peer, membership), ["198.51.100.11"])

    (seen,) = w.sink.seen
    assert seen.public_key == peer.public_key
    assert seen.endpoint == ("198.51.100.11", 51820)
    assert seen.gossip_port == 8080 and seen.how == "mdns"
    assert seen.cert is not None and seen.cert.name == "peer-1"
    assert w.tracker.status().peers == 1


def test_txt_entries_fit_255_bytes_with_the_longest_name() -> None:
    w = World()
    _, membership = _member(w.mesh, "z" * 32)
    txt = dm.build_txt(w.me, membership, 65535, 65535, TAG)
    assert all(len(k) + 1 + len(v) <= 255 for k, v in txt.items())


def test_non_member_is_a_stranger_never_a_peer() -> None:
    w = World()
    other_mesh = SigningKey.generate()
    stranger, membership = _member(other_mesh)

    w.tracker.service_updated("s", w.advert(stranger, membership), ["198.51.100.12"])

    assert w.sink.seen == []
    assert w.sink.strangers == [(stranger.public_key, mb.WRONG_MESH)]


def test_stolen_proof_next_to_another_key_is_a_stranger() -> None:
    w = World()
    _, membership = _member(w.mesh)
    thief = Identity.generate()

    w.tracker.service_updated("t", w.advert(thief, membership), ["198.51.100.13"])

    assert w.sink.seen == []
    assert w.sink.strangers == [(thief.public_key, mb.BAD_SIGNATURE)]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"v": "2"}, "v='2'"),
        ({"pk": "short"}, "not 32 bytes"),
        ({"pk": mb.encode_key(bytes(32))}, "not an Ed25519"),
        ({"wg": "70000"}, "not in 1..65535"),
        ({"gp": "x"}, "not a port"),
        ({"r": "zz"}, "hex digits"),
        ({"c0": "!!"}, "proof"),
    ],
)
def test_garbage_is_counted_and_logged_once(
    change: dict[str, str], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = World()
    peer, membership = _member(w.mesh)
    txt = dm.build_txt(peer, membership, 51820, 8080, "feedf00d") | change

    with caplog.at_level(logging.DEBUG, logger="gossipfl.discovery"):
        for _ in range(3):
            w.tracker.service_updated("g", _props(txt), ["198.51.100.14"])

    assert w.sink.seen == [] and w.sink.strangers == []
    assert w.tracker.status().garbage == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage()
    assert warnings[0].getMessage().startswith("198.51.100.14: ")


def test_oversized_txt_is_refused_before_decoding() -> None:
    w = World()
    props: dict[bytes, bytes | None] = {f"k{i}".encode(): b"v" for i in range(40)}
    w.tracker.service_updated("big", props, ["198.51.100.15"])
    assert w.tracker.status().garbage == 1


def test_non_ipv4_address_is_garbage() -> None:
    w = World()
    peer, membership = _member(w.mesh)
    w.tracker.service_updated("x", w.advert(peer, membership), ["not-an-ip"])
    w.tracker.service_updated("y", w.advert(peer, membership), [])
    assert w.tracker.status().garbage == 2 and w.sink.seen == []


def test_once_log_forgets_old_sources(caplog: pytest.LogCaptureFixture) -> None:
    once = dm.OnceLog(logging.getLogger("gossipfl.test"), size=2)
    with caplog.at_level(logging.DEBUG, logger="gossipfl.test"):
        for source in ("a", "b", "c", "a"):
            once.warning(source, "w", "%s: bad", source)
    levels = [(r.getMessage().split(":")[0], r.levelno) for r in caplog.records]
    assert levels == [("a", 30), ("b", 30), ("c", 30), ("a", 30)]


def test_peer_is_lost_only_after_the_grace_period() -> None:
    w = World(grace_s=30)
    peer, membership = _member(w.mesh)
    w.tracker.service_updated("a", w.advert(peer, membership), ["198.51.100.11"])

    w.tracker.service_removed("a")
    w.clock.now += 29
    w.tracker.tick()
    assert w.sink.lost == []
    w.clock.now += 1
    w.tracker.tick()
    assert w.sink.lost == [peer.public_key]
    w.tracker.tick()
    assert w.sink.lost == [peer.public_key]  # reported once


def test_peer_that_returns_within_grace_is_not_lost() -> None:
    w = World(grace_s=30)
    peer, membership = _member(w.mesh)
    ad = w.advert(peer, membership)
    w.tracker.service_updated("a", ad, ["198.51.100.11"])

    w.tracker.service_removed("a")
    w.clock.now += 20
    w.tracker.service_updated("a", ad, ["198.51.100.11"])
    w.clock.now += 100
    w.tracker.tick()
    assert w.sink.lost == []
    assert len(w.sink.seen) == 2


def test_peer_with_two_services_is_lost_when_the_last_goes() -> None:
    w = World(grace_s=5)
    peer, membership = _member(w.mesh)
    w.tracker.service_updated("old", w.advert(peer, membership), ["198.51.100.11"])
    w.tracker.service_updated("new", w.advert(peer, membership), ["198.51.100.11"])

    w.tracker.service_removed("old")
    w.clock.now += 10
    w.tracker.tick()
    assert w.sink.lost == []
    w.tracker.service_removed("new")
    w.clock.now += 10
    w.tracker.tick()
    assert w.sink.lost == [peer.public_key]


def test_rebuild_sends_every_service_to_grace() -> None:
    w = World(grace_s=5)
    peer, membership = _member(w.mesh)
    w.tracker.service_updated("a", w.advert(peer, membership), ["198.51.100.11"])
    w.tracker.forget_all()
    w.clock.now += 5
    w.tracker.tick()
    assert w.sink.lost == [peer.public_key]


def test_duplicate_identity_from_another_address_is_reported() -> None:
    w = World()
    clone = w.advert(w.me, w.my_membership, tag="99999999")

    w.tracker.service_updated("clone", clone, ["198.51.100.20"])

    assert w.sink.duplicates == ["198.51.100.20"]
    assert w.tracker.status().duplicate_addresses == ["198.51.100.20"]
    assert w.sink.seen == []


def test_our_own_advertisement_and_our_stale_one_are_not_duplicates() -> None:
    w = World()
    mine = w.advert(w.me, w.my_membership, tag=TAG)
    stale = w.advert(w.me, w.my_membership, tag="99999999")

    w.tracker.service_updated("me", mine, ["198.51.100.10"])
    w.tracker.service_updated("me-before", stale, ["198.51.100.10"])

    assert w.sink.duplicates == [] and w.sink.seen == []


def test_instance_label_is_unique_and_short() -> None:
    key = Identity.generate().public_key
    label = dm.instance_label("box.example.org", key, TAG)
    assert label == f"box-{key.hex()[:8]}-{TAG}"
    long = dm.instance_label("h" * 100, key, TAG)
    assert len(long) == 63 and long.endswith(TAG)
    assert dm.instance_label("a b_c", key, TAG).startswith("a-b-c-")


def test_select_underlay_skips_loopback_down_and_tunnels() -> None:
    def link(name: str, flags: list[str], addr: str,
             kind: str = "") -> dict:  # type: ignore[type-arg]
        info = {"linkinfo": {"info_kind": kind}} if kind else {}
        return {
            "ifname": name,
            "flags": flags,
            **info,
            "addr_info": [
                {"family": "inet", "local": addr, "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "scope": "link"},
            ],
        }

    links = [
        link("lo", ["LOOPBACK", "UP"], "127.0.0.1"),
        link("ul0", ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "198.51.100.10"),
        link("ul1", ["BROADCAST", "MULTICAST"], "203.0.113.5"),
        link("gfl0", ["POINTOPOINT", "UP"], "198.18.0.1", "tun"),
        link("wg1", ["UP"], "198.18.0.2", "wireguard"),
        link("ul2", ["BROADCAST", "UP"], "192.0.2.7"),
    ]
    assert dm.select_underlay(links) == ["192.0.2.7", "198.51.100.10"]
    assert dm.select_underlay(links, interfaces=["ul0"]) == ["198.51.100.10"]
    assert dm.select_underlay(links, exclude=["ul2"]) == ["198.51.100.10"]


def test_seeds() -> None:
    key = Identity.generate().public_key
    peer = dm.parse_seed(f"{mb.encode_key(key)}@198.51.100.30:51820", 8080)
    assert peer.how == "seed" and peer.cert is None
    assert peer.endpoint == ("198.51.100.30", 51820) and peer.gossip_port == 8080
    assert dm.parse_seed(f"{key.hex()}@[2001:db8::1]:1", 1).endpoint[0] == "2001:db8::1"
    for bad in ("nokey", f"{key.hex()}@host:1", f"{key.hex()}@192.0.2.1:0"):
        with pytest.raises(ConfigError):
            dm.parse_seed(bad, 8080)


def test_endpoint_record_round_trip() -> None:
    mesh = SigningKey.generate()
    node, membership = _member(mesh, "far")
    endpoints = [("203.0.113.9", 51820), ("2001:db8::9", 51821)]
    data = dm.encode_endpoint_record(node, membership, endpoints, 8080, NOW)

    record = dm.verify_endpoint_record(data, bytes(mesh.verify_key), NOW + 5)
    assert record.peer.public_key == node.public_key
    assert record.peer.endpoints == tuple(endpoints)
    assert record.peer.how == "record" and record.timestamp_ms == int(NOW * 1000)
    assert len(data) <= dm.MAX_RECORD_BYTES


def test_endpoint_record_refusals() -> None:
    mesh = SigningKey.generate()
    node, membership = _member(mesh)
    mesh_pub = bytes(mesh.verify_key)
    data = dm.encode_endpoint_record(
        node, membership, [("203.0.113.9", 51820)], 8080, NOW
    )

    def reason(blob: bytes, now: float = NOW) -> str:
        with pytest.raises(MessageRefused) as info:
            dm.verify_endpoint_record(blob, mesh_pub, now)
        return info.value.reason

    tampered = bytearray(data)
    tampered[-70] ^= 1  # inside the endpoint address
    assert reason(bytes(tampered)) == mb.BAD_SIGNATURE
    assert reason(data, NOW + 601) == dm.STALE
    assert reason(data, NOW - 301) == dm.FROM_FUTURE
    assert reason(data[:20]) == "malformed"
    assert reason(data + b"x") == "malformed"
    with pytest.raises(DecodeError, match="exceeds max"):
        dm.verify_endpoint_record(b"\x01" * 2000, mesh_pub, NOW)
    foreign = SigningKey.generate()
    stranger, foreign_membership = _member(foreign)
    other = dm.encode_endpoint_record(
        stranger, foreign_membership, [("203.0.113.9", 1)], 1, NOW
    )
    assert reason(other) == mb.WRONG_MESH
