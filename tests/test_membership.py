"""Membership certificates: encoding, verification failures, files, TXT proofs."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from gossipfl import membership as mb
from gossipfl.errors import ConfigError, DecodeError, MessageRefused, StateError
from gossipfl.identity import Identity

NOW = 1_700_000_000


def _cert(
    mesh: SigningKey, node: Identity, name: str = "box-1", expires: int | None = None
) -> mb.Certificate:
    return mb.issue_certificate(mesh, node.public_key, name, NOW, expires)


def test_certificate_round_trips_through_bytes_and_text() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    cert = _cert(mesh, node, "ünïcode-box", NOW + 3600)

    assert mb.Certificate.from_bytes(cert.to_bytes()) == cert
    assert mb.Certificate.from_text(cert.to_text()) == cert
    assert len(cert.signature) == 64
    mb.verify_certificate(cert, bytes(mesh.verify_key), NOW + 1, node.public_key)


def test_largest_certificate_fits_limits() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    cert = _cert(mesh, node, "x" * mb.MAX_NAME_BYTES, NOW + 1)

    assert len(cert.to_bytes()) == mb.MAX_CERT_BYTES
    assert len(cert.to_proof()) == mb.MAX_PROOF_BYTES
    for key, value in mb.proof_txt_entries(cert.to_proof()).items():
        assert len(key) + 1 + len(value) <= mb.MAX_TXT_ENTRY_BYTES


def test_wrong_mesh_is_named() -> None:
    mesh, other = SigningKey.generate(), SigningKey.generate()
    node = Identity.generate()
    cert = _cert(other, node)

    with pytest.raises(MessageRefused) as info:
        mb.verify_certificate(cert, bytes(mesh.verify_key), NOW)
    assert info.value.reason == mb.WRONG_MESH


def test_forged_signature_is_refused_before_expiry_is_looked_at() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    cert = _cert(mesh, node, expires=NOW + 10)
    forged = mb.Certificate(
        cert.mesh_public_key,
        cert.node_public_key,
        "evil",
        cert.issued_at,
        cert.expires_at,
        cert.signature,
    )

    with pytest.raises(MessageRefused) as info:
        mb.verify_certificate(forged, bytes(mesh.verify_key), NOW + 100)
    assert info.value.reason == mb.BAD_SIGNATURE


def test_expired_and_not_yet_valid() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    cert = _cert(mesh, node, expires=NOW + 10)
    mesh_pub = bytes(mesh.verify_key)

    with pytest.raises(MessageRefused) as info:
        mb.verify_certificate(cert, mesh_pub, NOW + 10)
    assert info.value.reason == mb.EXPIRED
    with pytest.raises(MessageRefused) as info:
        mb.verify_certificate(cert, mesh_pub, NOW - 1000, max_skew_s=300)
    assert info.value.reason == mb.NOT_YET_VALID
    mb.verify_certificate(cert, mesh_pub, NOW - 200, max_skew_s=300)


def test_certificate_for_another_node_is_refused() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    cert = _cert(mesh, node)

    with pytest.raises(MessageRefused) as info:
        mb.verify_certificate(
            cert, bytes(mesh.verify_key), NOW, Identity.generate().public_key
        )
    assert info.value.reason == mb.WRONG_NODE


@pytest.mark.parametrize(
    ("mutate", "offset"),
    [
        (lambda b: b[:40], 34),  # cut inside the node key
        (lambda b: bytes([2]) + b[1:], 0),  # version
        (lambda b: b[:1] + bytes([0x80]) + b[2:], 1),  # unknown flag
        (lambda b: b[:66] + bytes([0]) + b[67:], 66),  # empty name
        (lambda b: b[:66] + bytes([40]) + b[67:], 66),  # name too long
        (lambda b: b + b"\x00", None),  # trailing byte
    ],
)
def test_malformed_certificate_names_the_offset(
    mutate: Callable[[bytes], bytes], offset: int | None
) -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    raw = _cert(mesh, node, "abcde").to_bytes()
    bad = mutate(raw)

    with pytest.raises(DecodeError) as info:
        mb.Certificate.from_bytes(bad)
    expected = len(raw) if offset is None else offset
    assert info.value.offset == expected
    assert f"offset {expected}" in str(info.value)


def test_oversized_certificate_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="exceeds max"):
        mb.Certificate.from_bytes(b"\x01" * 1000)
    with pytest.raises(DecodeError, match="exceeds max"):
        mb.Certificate.from_text("A" * 10_000)


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        mb.Certificate.from_bytes(data)


def test_proof_round_trip_and_wrong_mesh() -> None:
    mesh, other = SigningKey.generate(), SigningKey.generate()
    node = Identity.generate()
    cert = _cert(mesh, node, expires=NOW + 60)
    mesh_pub = bytes(mesh.verify_key)

    proof = mb.proof_from_txt(mb.proof_txt_entries(cert.to_proof()))
    assert mb.verify_proof(proof, node.public_key, mesh_pub, NOW) == cert

    foreign = _cert(other, node).to_proof()
    with pytest.raises(MessageRefused) as info:
        mb.verify_proof(foreign, node.public_key, mesh_pub, NOW)
    assert info.value.reason == mb.WRONG_MESH

    # A proof carried next to another node's key does not verify.
    with pytest.raises(MessageRefused) as info:
        mb.verify_proof(proof, Identity.generate().public_key, mesh_pub, NOW)
    assert info.value.reason == mb.BAD_SIGNATURE


def test_txt_entries_split_and_join_long_payloads() -> None:
    payload = bytes(range(256)) * 1
    entries = mb.proof_txt_entries(payload)
    assert len(entries) == 2
    assert all(len(k) + 1 + len(v) <= 255 for k, v in entries.items())
    # The join caps the size, so a payload this long is refused...
    with pytest.raises(DecodeError, match="exceeds max"):
        mb.proof_from_txt(entries)
    # ...and a missing first chunk is named.
    with pytest.raises(DecodeError, match="c0"):
        mb.proof_from_txt({"c1": "AAAA"})


def test_key_text_forms() -> None:
    key = Identity.generate().public_key
    assert mb.decode_key(mb.encode_key(key)) == key
    assert mb.decode_key(key.hex()) == key
    with pytest.raises(ConfigError, match="not 32 bytes"):
        mb.decode_key("abc")


def test_name_limits() -> None:
    mesh, node = SigningKey.generate(), Identity.generate()
    with pytest.raises(ConfigError, match="33 bytes"):
        _cert(mesh, node, "y" * 33)
    with pytest.raises(ConfigError, match="unprintable"):
        _cert(mesh, node, "a\nb")


def test_create_sign_join_load(tmp_path: Path) -> None:
    mesh_dir, state_dir = tmp_path / "mesh", tmp_path / "state"
    node = Identity.generate()

    mesh_pub = mb.create_mesh(mesh_dir)
    assert stat.S_IMODE((mesh_dir / "mesh.key").stat().st_mode) == 0o600
    assert mb.decode_key((mesh_dir / "mesh.pub").read_text()) == mesh_pub
    with pytest.raises(StateError, match="refusing"):
        mb.create_mesh(mesh_dir)

    cert = mb.sign_node(mesh_dir, node.node_id, "edge-7", valid_for_s=3600, now=NOW)
    pub_text = (mesh_dir / "mesh.pub").read_text()
    joined = mb.join_mesh(state_dir, node, cert.to_text(), pub_text, now=NOW)
    assert joined.mesh_public_key == mesh_pub
    assert mb.load_membership(state_dir, node, now=NOW + 1) == joined
    with pytest.raises(StateError, match="expired"):
        mb.load_membership(state_dir, node, now=NOW + 3600)


def test_join_refuses_someone_elses_cert_and_a_changed_mesh(tmp_path: Path) -> None:
    mesh_dir, state_dir = tmp_path / "mesh", tmp_path / "state"
    mb.create_mesh(mesh_dir)
    node, other = Identity.generate(), Identity.generate()
    others = mb.sign_node(mesh_dir, other.node_id, "other", now=NOW)
    with pytest.raises(ConfigError, match="another node"):
        mb.join_mesh(state_dir, node, others.to_text(), now=NOW)

    mine = mb.sign_node(mesh_dir, node.node_id, "mine", now=NOW)
    mb.join_mesh(state_dir, node, mine.to_text(), now=NOW)  # trust on first use
    foreign = mb.issue_certificate(SigningKey.generate(), node.public_key, "x", NOW)
    with pytest.raises(ConfigError, match="wrong_mesh"):
        mb.join_mesh(state_dir, node, foreign.to_text(), now=NOW)
    with pytest.raises(ConfigError, match="does not parse"):
        mb.join_mesh(state_dir, node, "!!!", now=NOW)


def test_mesh_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    mb.create_mesh(tmp_path)
    (tmp_path / "mesh.key").chmod(0o644)
    with pytest.raises(StateError, match="0644"):
        mb.sign_node(tmp_path, Identity.generate().node_id, "n", now=NOW)
