"""A node's identity: one Ed25519 key pair, kept in the state directory.

The 32-byte seed lives in ``identity.key`` (mode 0600, directory 0700). The public key
is the node id; its first eight hex digits are the short id used in every log line.
Keys are made on the box the first time they are needed, never at build time.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import StateError

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
IDENTITY_FILE = "identity.key"


def short_id(public_key: bytes) -> str:
    """The first eight hex digits of a public key: what logs print for a peer."""
    return public_key.hex()[:8]


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return self.public_key.hex()

    @property
    def short_id(self) -> str:
        return short_id(self.public_key)

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != SEED_BYTES:
            raise StateError(
                f"identity seed is {len(seed)} bytes, expected {SEED_BYTES}")
        return cls(SigningKey(seed))


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``data``."""
    try:
        VerifyKey(public_key).verify(data, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700, and tighten it if it exists."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise StateError(f"cannot use {path} as a private directory: "
                         f"{exc.strerror or exc}") from None


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically and durably.

    A crash at any instant leaves the old file or the new one, never a torn one:
    the data goes to a temporary file that is fsynced, renamed over ``path``, and
    the directory fsynced.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_private_file(path: Path, missing: str) -> bytes:
    """A secret's bytes; refuses a file group or others can read or write.

    ``missing`` is what to tell the operator when there is no such file.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"no {path}; {missing}") from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateError(
            f"{path} has mode {stat.S_IMODE(mode):04o}; it must be 0600 or stricter"
        )
    return data


def load_identity(state_dir: Path) -> Identity:
    """Read the identity from ``state_dir``; refuse a file others can read."""
    seed = read_private_file(state_dir / IDENTITY_FILE, "run 'gossipfl init'")
    return Identity.from_seed(seed)


def load_or_create_identity(state_dir: Path) -> tuple[Identity, bool]:
    """The identity in ``state_dir``, made now if there is none; True if made."""
    ensure_private_dir(state_dir)
    path = state_dir / IDENTITY_FILE
    if os.path.lexists(path):
        if not path.exists():
            # exists() follows the link: a dangling one must not pass for "no key".
            raise StateError(f"{path} is a dangling link (to {os.readlink(path)}); "
                             "restore its target or remove the link, a node's key "
                             "is never replaced")
        return load_identity(state_dir), False
    identity = Identity.generate()
    write_private_file(path, identity.seed)
    return identity, True
