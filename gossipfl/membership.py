"""Who belongs to a mesh: a mesh key signs one certificate per node.

Naive way: a shared secret (a pre-shared WireGuard key or a password) known to every
node. One leaked box then lets strangers in, and nobody can be told apart. Chosen way:
a mesh key pair (Ed25519) kept by the operator on one box. It signs a *node
certificate* binding the mesh public key, the node's Ed25519 public key, a name and a
validity window. A node proves membership by showing its certificate; anyone holding
the mesh public key checks it offline. No server, no network round trip.

Left out on purpose: revocation lists (expiry is the tool for now: issue short-lived
certificates and re-sign) and intermediate authorities.

Certificate, version 1, all integers big-endian::

    offset  size  field
    0       1     version (1)
    1       1     flags: bit 0 set when an expiry follows issued-at
    2       32    mesh public key (Ed25519)
    34      32    node public key (Ed25519)
    66      1     name length N, 1..32
    67      N     node name, UTF-8, printable
    67+N    8     issued at, unix seconds
    75+N    8     expires at, unix seconds (only when flag bit 0)
    ...     64    Ed25519 signature by the mesh key of CERT_DOMAIN + everything above

The text form is unpadded URL-safe base64 of those bytes, one line. The *proof* is the
same certificate without the two public keys: a verifier that already holds the mesh
public key (its own) and the node public key (advertised next to it) rebuilds the full
certificate. An 8-byte mesh key id replaces the mesh key so that "this is some other
mesh" stays a distinct, nameable failure. A proof is at most 123 bytes, 164 base64
characters, so it fits one mDNS TXT entry; ``proof_txt_entries`` still splits longer
payloads so the TXT format does not need to change if the certificate grows.

Files (the CLI calls the functions named here)::

    <mesh dir>/mesh.key    0600  32-byte Ed25519 seed of the mesh key   mesh create
    <mesh dir>/mesh.pub    0644  text public key + newline               mesh create
    <state dir>/mesh.pub   0644  the mesh this node joined               mesh join
    <state dir>/node.cert  0644  this node's certificate, text form      mesh join

``gossipfl mesh create`` calls ``create_mesh(mesh_dir)``; ``gossipfl mesh sign
<node-pubkey>`` calls ``sign_node(mesh_dir, node_pubkey_text, name, valid_for_s)`` and
prints ``cert.to_text()``; ``gossipfl mesh join <cert>`` calls
``join_mesh(state_dir, identity, cert_text, mesh_pub_text)``. The daemon calls
``load_membership(state_dir, identity, now)`` at start.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from . import identity as ident
from .errors import ConfigError, DecodeError, MessageRefused, StateError

logger = logging.getLogger(__name__)

# Protocol values.
CERT_VERSION = 1
CERT_DOMAIN = b"gossipfl node certificate v1\x00"
FLAG_HAS_EXPIRY = 0x01
MAX_NAME_BYTES = 32
MESH_KEY_ID_BYTES = 8
MAX_CERT_BYTES = 1 + 1 + 32 + 32 + 1 + MAX_NAME_BYTES + 8 + 8 + ident.SIGNATURE_BYTES
MAX_PROOF_BYTES = MAX_CERT_BYTES - 64 + MESH_KEY_ID_BYTES
MAX_CERT_TEXT_CHARS = 4 * ((MAX_CERT_BYTES + 2) // 3)
MAX_TXT_ENTRY_BYTES = 255  # RFC 6763 section 6.1: one length byte per string
PROOF_TXT_PREFIX = "c"

# Tuning values.
DEFAULT_MAX_SKEW_S = 300.0  # how far in the future issued-at may be (clock skew)

MESH_KEY_FILE = "mesh.key"
MESH_PUB_FILE = "mesh.pub"
NODE_CERT_FILE = "node.cert"

# Refusal reasons a verifier can give; MessageRefused.reason carries one of them.
WRONG_MESH = "wrong_mesh"
WRONG_NODE = "wrong_node"
BAD_SIGNATURE = "bad_signature"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"


def encode_key(public_key: bytes) -> str:
    """The text form of a 32-byte public key: unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(public_key).rstrip(b"=").decode("ascii")


def decode_key(text: str, what: str = "public key") -> bytes:
    """A 32-byte key from its base64 text form or its 64-digit hex form."""
    text = text.strip()
    if len(text) == 64:
        with contextlib.suppress(ValueError):  # not hex: try base64
            return bytes.fromhex(text)
    raw = _b64decode(text, 44)
    if raw is None or len(raw) != ident.PUBLIC_KEY_BYTES:
        raise ConfigError(
            f"{what} {text[:50]!r} is not 32 bytes of base64 or 64 hex digits"
        )
    return raw


def mesh_key_id(mesh_public_key: bytes) -> bytes:
    """The 8-byte id of a mesh key that proofs carry instead of the whole key."""
    return hashlib.sha256(b"gossipfl mesh id\x00" + mesh_public_key).digest()[
        :MESH_KEY_ID_BYTES
    ]


@dataclass(frozen=True)
class Certificate:
    """A mesh key's statement that ``node_public_key`` belongs to the mesh."""

    mesh_public_key: bytes
    node_public_key: bytes
    name: str
    issued_at: int
    expires_at: int | None
    signature: bytes

    def signed_bytes(self) -> bytes:
        """Everything the signature covers, without the domain prefix."""
        return _body(
            self.mesh_public_key,
            self.node_public_key,
            self.name.encode("utf-8"),
            self.issued_at,
            self.expires_at,
        )

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    def to_text(self) -> str:
        return base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse a certificate; DecodeError names the byte offset that is wrong.

        Parsing checks the layout only; call ``verify_certificate`` to trust it.
        """
        reader, flags = _read_head(data, "certificate", MAX_CERT_BYTES)
        mesh_pub = reader.take(32, "mesh public key")
        node_pub = reader.take(32, "node public key")
        name, issued, expires = _read_tail_fields(reader, flags)
        signature = reader.take(ident.SIGNATURE_BYTES, "signature")
        reader.end()
        return cls(mesh_pub, node_pub, name, issued, expires, signature)

    @classmethod
    def from_text(cls, text: str) -> Certificate:
        text = text.strip()
        if len(text) > MAX_CERT_TEXT_CHARS:
            raise DecodeError(
                f"certificate text of {len(text)} chars exceeds max "
                f"{MAX_CERT_TEXT_CHARS}",
                0,
            )
        raw = _b64decode(text, MAX_CERT_TEXT_CHARS)
        if raw is None:
            raise DecodeError("certificate text is not URL-safe base64", 0)
        return cls.from_bytes(raw)

    def to_proof(self) -> bytes:
        """The compact proof: the certificate less both public keys (see top)."""
        name = self.name.encode("utf-8")
        flags = FLAG_HAS_EXPIRY if self.expires_at is not None else 0
        out = bytearray([CERT_VERSION, flags])
        out += mesh_key_id(self.mesh_public_key)
        out += bytes([len(name)]) + name + struct.pack(">Q", self.issued_at)
        if self.expires_at is not None:
            out += struct.pack(">Q", self.expires_at)
        return bytes(out) + self.signature

    @classmethod
    def from_proof(
        cls, proof: bytes, node_public_key: bytes, mesh_public_key: bytes
    ) -> Certificate:
        """Rebuild a certificate from a proof; WRONG_MESH if the key id differs."""
        reader, flags = _read_head(proof, "proof", MAX_PROOF_BYTES)
        key_id = reader.take(MESH_KEY_ID_BYTES, "mesh key id")
        name, issued, expires = _read_tail_fields(reader, flags)
        signature = reader.take(ident.SIGNATURE_BYTES, "signature")
        reader.end()
        if key_id != mesh_key_id(mesh_public_key):
            raise MessageRefused(
                WRONG_MESH,
                f"proof is for mesh id {key_id.hex()}, "
                f"ours is {mesh_key_id(mesh_public_key).hex()}",
            )
        return cls(mesh_public_key, node_public_key, name, issued, expires, signature)


def _body(
    mesh_pub: bytes, node_pub: bytes, name: bytes, issued: int, expires: int | None
) -> bytes:
    flags = FLAG_HAS_EXPIRY if expires is not None else 0
    out = bytearray([CERT_VERSION, flags]) + mesh_pub + node_pub
    out += bytes([len(name)]) + name + struct.pack(">Q", issued)
    if expires is not None:
        out += struct.pack(">Q", expires)
    return bytes(out)


class _Reader:
    """Reads fields off a byte string, raising DecodeError with the offset."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DecodeError(
                f"{self.what} ends inside {field}: needs {n} bytes, "
                f"{len(self.data) - self.pos} left",
                self.pos,
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1, "a byte")[0]

    def u64(self, field: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, field))[0]
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(
                f"{len(self.data) - self.pos} trailing bytes after {self.what}",
                self.pos,
            )


def _read_head(data: bytes, what: str, max_bytes: int) -> tuple[_Reader, int]:
    """Size cap, version and flags, common to certificates and proofs."""
    if len(data) > max_bytes:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds max {max_bytes}",
                          max_bytes)
    reader = _Reader(data, what)
    version = reader.u8()
    if version != CERT_VERSION:
        raise DecodeError(f"{what} version {version} is not 1", 0)
    flags = reader.u8()
    if flags & ~FLAG_HAS_EXPIRY:
        raise DecodeError(f"unknown {what} flags 0x{flags:02x}", 1)
    return reader, flags


def _read_tail_fields(reader: _Reader, flags: int) -> tuple[str, int, int | None]:
    """Name, issued-at and expiry: the part certificate and proof share."""
    at = reader.pos
    name_len = reader.u8()
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise DecodeError(f"name length {name_len} not in 1..{MAX_NAME_BYTES}", at)
    at = reader.pos
    try:
        name = reader.take(name_len, "name").decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("name is not UTF-8", at) from None
    if not name.isprintable():
        raise DecodeError(f"name {name!r} has unprintable characters", at)
    issued = reader.u64("issued-at")
    expires: int | None = None
    if flags & FLAG_HAS_EXPIRY:
        at = reader.pos
        expires = reader.u64("expiry")
        if expires <= issued:
            raise DecodeError(f"expiry {expires} is not after issued-at {issued}", at)
    return name, issued, expires


def _b64decode(text: str, max_chars: int) -> bytes | None:
    if len(text) > max_chars:
        return None
    try:
        return base64.b64decode(
            text + "=" * (-len(text) % 4), altchars=b"-_", validate=True
        )
    except (binascii.Error, ValueError):
        return None


def check_name(name: str) -> bytes:
    """The UTF-8 bytes of a node name, or ConfigError saying what is wrong."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise ConfigError(
            f"node name {name!r} is {len(raw)} bytes of UTF-8; 1..{MAX_NAME_BYTES}"
        )
    if not name.isprintable():
        raise ConfigError(f"node name {name!r} has unprintable characters")
    return raw


def issue_certificate(
    mesh_key: SigningKey,
    node_public_key: bytes,
    name: str,
    issued_at: int,
    expires_at: int | None = None,
) -> Certificate:
    """Sign ``node_public_key`` into a certificate of the mesh ``mesh_key``."""
    raw_name = check_name(name)
    if len(node_public_key) != ident.PUBLIC_KEY_BYTES:
        raise ConfigError(
            f"node public key is {len(node_public_key)} bytes, expected 32"
        )
    if expires_at is not None and expires_at <= issued_at:
        raise ConfigError(f"expiry {expires_at} is not after issued-at {issued_at}")
    mesh_pub = bytes(mesh_key.verify_key)
    body = _body(mesh_pub, node_public_key, raw_name, issued_at, expires_at)
    signature = mesh_key.sign(CERT_DOMAIN + body).signature
    return Certificate(
        mesh_pub, node_public_key, name, issued_at, expires_at, signature
    )


def verify_certificate(
    cert: Certificate,
    mesh_public_key: bytes,
    now: float,
    node_public_key: bytes | None = None,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
) -> None:
    """Raise MessageRefused unless ``cert`` is valid for our mesh at ``now``.

    Checks, in this order: the mesh key (WRONG_MESH), the node key when one is given
    (WRONG_NODE), the signature (BAD_SIGNATURE), then the validity window (EXPIRED,
    NOT_YET_VALID). The signature comes before time so that a forged certificate is
    never reported as merely expired.
    """
    who = ident.short_id(cert.node_public_key)
    if cert.mesh_public_key != mesh_public_key:
        raise MessageRefused(
            WRONG_MESH,
            f"{who}: certificate is from mesh {encode_key(cert.mesh_public_key)}, "
            f"ours is {encode_key(mesh_public_key)}",
        )
    if node_public_key is not None and cert.node_public_key != node_public_key:
        raise MessageRefused(
            WRONG_NODE,
            f"{who}: certificate is for another node than "
            f"{ident.short_id(node_public_key)}",
        )
    if not ident.verify(
        mesh_public_key, CERT_DOMAIN + cert.signed_bytes(), cert.signature
    ):
        raise MessageRefused(BAD_SIGNATURE, f"{who}: mesh signature does not verify")
    if cert.expires_at is not None and now >= cert.expires_at:
        raise MessageRefused(
            EXPIRED, f"{who}: certificate expired at {cert.expires_at}, now {now:.0f}"
        )
    if cert.issued_at > now + max_skew_s:
        raise MessageRefused(
            NOT_YET_VALID,
            f"{who}: certificate issued at {cert.issued_at}, "
            f"more than {max_skew_s:.0f} s after now {now:.0f}",
        )


def verify_proof(
    proof: bytes,
    node_public_key: bytes,
    mesh_public_key: bytes,
    now: float,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
) -> Certificate:
    """The certificate a proof stands for, verified; MessageRefused otherwise."""
    cert = Certificate.from_proof(proof, node_public_key, mesh_public_key)
    verify_certificate(cert, mesh_public_key, now, max_skew_s=max_skew_s)
    return cert


# mDNS TXT entries.


def proof_txt_entries(proof: bytes) -> dict[str, str]:
    """``c0``, ``c1``, ... entries holding the proof's base64, each ≤ 255 bytes."""
    text = base64.urlsafe_b64encode(proof).rstrip(b"=").decode("ascii")
    room = MAX_TXT_ENTRY_BYTES - len(PROOF_TXT_PREFIX) - 2 - 1  # "c" + 2 digits + "="
    chunks = [text[i : i + room] for i in range(0, len(text), room)] or [""]
    return {f"{PROOF_TXT_PREFIX}{i}": chunk for i, chunk in enumerate(chunks)}


def proof_from_txt(entries: Mapping[str, str]) -> bytes:
    """Join ``c0``, ``c1``, ... back into the proof; DecodeError if any is off."""
    parts: list[str] = []
    for i in range(len(entries) + 1):
        chunk = entries.get(f"{PROOF_TXT_PREFIX}{i}")
        if chunk is None:
            break
        parts.append(chunk)
    if not parts:
        raise DecodeError("no proof entry c0", 0)
    text = "".join(parts)
    max_chars = 4 * ((MAX_PROOF_BYTES + 2) // 3)
    if len(text) > max_chars:
        raise DecodeError(
            f"proof text of {len(text)} chars exceeds max {max_chars}", max_chars
        )
    raw = _b64decode(text, max_chars)
    if raw is None:
        raise DecodeError("proof entries are not URL-safe base64", 0)
    return raw


# Files and the CLI's entry points.


@dataclass(frozen=True)
class Membership:
    """What a joined node knows: the mesh it belongs to and its own certificate."""

    mesh_public_key: bytes
    cert: Certificate

    @property
    def proof(self) -> bytes:
        return self.cert.to_proof()


def create_mesh(mesh_dir: Path) -> bytes:
    """``gossipfl mesh create``: make the mesh key pair; its public key is returned.

    Refuses to overwrite an existing ``mesh.key``: that would orphan every node.
    """
    ident.ensure_private_dir(mesh_dir)
    key_path = mesh_dir / MESH_KEY_FILE
    if key_path.exists():
        raise StateError(f"{key_path} exists; refusing to replace a mesh key")
    key = SigningKey.generate()
    ident.write_private_file(key_path, bytes(key))
    public_key = bytes(key.verify_key)
    _write_public_file(mesh_dir / MESH_PUB_FILE, encode_key(public_key) + "\n")
    logger.info("created mesh %s in %s", encode_key(public_key), mesh_dir)
    return public_key


def load_mesh_key(mesh_dir: Path) -> SigningKey:
    """The mesh signing key from ``mesh_dir``; refuses a file others can read."""
    path = mesh_dir / MESH_KEY_FILE
    seed = ident.read_private_file(path, "run 'gossipfl mesh create'")
    if len(seed) != ident.SEED_BYTES:
        raise StateError(f"{path} holds {len(seed)} bytes, expected {ident.SEED_BYTES}")
    return SigningKey(seed)


def sign_node(
    mesh_dir: Path,
    node_public_key_text: str,
    name: str,
    valid_for_s: int | None = None,
    now: float | None = None,
) -> Certificate:
    """``gossipfl mesh sign <node-pubkey>``: a certificate for that node."""
    mesh_key = load_mesh_key(mesh_dir)
    node_pub = decode_key(node_public_key_text, "node public key")
    issued = int(time.time() if now is None else now)
    if valid_for_s is not None and valid_for_s <= 0:
        raise ConfigError(f"validity {valid_for_s} s must be positive")
    expires = None if valid_for_s is None else issued + valid_for_s
    cert = issue_certificate(mesh_key, node_pub, name, issued, expires)
    logger.info(
        "%s signed as %r into mesh %s, expires %s",
        ident.short_id(node_pub),
        name,
        encode_key(cert.mesh_public_key),
        "never" if expires is None else expires,
    )
    return cert


def join_mesh(
    state_dir: Path,
    identity: ident.Identity,
    cert_text: str,
    mesh_public_key_text: str | None = None,
    now: float | None = None,
) -> Membership:
    """``gossipfl mesh join <cert>``: check the certificate and store it.

    The mesh public key to trust is, in order: ``mesh_public_key_text`` when given,
    else the ``mesh.pub`` already in the state directory, else the one the
    certificate names (trust on first use; the log says so). The certificate must be
    for this node's key and valid now. Any failure is a ConfigError: the operator
    handed us the wrong thing.
    """
    now = time.time() if now is None else now
    try:
        cert = Certificate.from_text(cert_text)
    except DecodeError as exc:
        raise ConfigError(f"certificate does not parse: {exc}") from None
    pinned = _read_mesh_pub(state_dir / MESH_PUB_FILE)
    if mesh_public_key_text is not None:
        mesh_pub = decode_key(mesh_public_key_text, "mesh public key")
        if pinned is not None and pinned != mesh_pub:
            raise ConfigError(
                f"{state_dir / MESH_PUB_FILE} pins mesh {encode_key(pinned)}, "
                f"not {encode_key(mesh_pub)}; remove it to change meshes"
            )
    elif pinned is not None:
        mesh_pub = pinned
    else:
        mesh_pub = cert.mesh_public_key
        logger.warning(
            "%s trusting mesh %s named by the certificate (no mesh.pub given)",
            identity.short_id,
            encode_key(mesh_pub),
        )
    try:
        verify_certificate(cert, mesh_pub, now, node_public_key=identity.public_key)
    except MessageRefused as exc:
        raise ConfigError(f"certificate refused: {exc}") from None

    ident.ensure_private_dir(state_dir)
    _write_public_file(state_dir / MESH_PUB_FILE, encode_key(mesh_pub) + "\n")
    _write_public_file(state_dir / NODE_CERT_FILE, cert.to_text() + "\n")
    logger.info(
        "%s joined mesh %s as %r", identity.short_id, encode_key(mesh_pub), cert.name
    )
    return Membership(mesh_pub, cert)


def load_membership(
    state_dir: Path, identity: ident.Identity, now: float | None = None
) -> Membership:
    """The joined mesh and our certificate, checked; StateError if unusable."""
    now = time.time() if now is None else now
    mesh_pub = _read_mesh_pub(state_dir / MESH_PUB_FILE)
    if mesh_pub is None:
        raise StateError(
            f"no {state_dir / MESH_PUB_FILE}; run 'gossipfl mesh join <cert>'"
        )
    cert_path = state_dir / NODE_CERT_FILE
    try:
        cert = Certificate.from_text(cert_path.read_text("ascii"))
    except FileNotFoundError:
        raise StateError(f"no {cert_path}; run 'gossipfl mesh join <cert>'") from None
    except (DecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{cert_path} is corrupt: {exc}") from None
    try:
        verify_certificate(cert, mesh_pub, now, node_public_key=identity.public_key)
    except MessageRefused as exc:
        raise StateError(f"{cert_path}: {exc}") from None
    return Membership(mesh_pub, cert)


def _read_mesh_pub(path: Path) -> bytes | None:
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise StateError(f"{path} is not ASCII text") from None
    try:
        return decode_key(text, f"mesh public key in {path}")
    except ConfigError as exc:
        raise StateError(str(exc)) from None


def _write_public_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "ascii")
    tmp.chmod(0o644)
    tmp.replace(path)
