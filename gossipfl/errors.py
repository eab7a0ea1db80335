"""One exception tree for the whole package.

``GossipflError`` is the root. Its children say whose fault a failure is:

* ``ConfigError``: the operator's configuration or command line is wrong.
* ``StateError``: files in the state directory are missing, corrupt or unsafe.
* ``MessageRefused``: a peer sent something we will not act on. It carries a short
  machine-readable ``reason`` (counted in status, sent back in the 4xx body).
* ``DecodeError``: a ``MessageRefused`` for bytes that do not parse; it carries the
  byte ``offset`` where parsing stopped.
* ``MeshError``: WireGuard, namespaces or discovery could not be set up.

Messages carry the offending value and the limit it broke, e.g.
``"dimension 70000 exceeds the model's 4810"``.
"""

from __future__ import annotations


class GossipflError(Exception):
    """Root of every error gossipfl raises on purpose."""


class ConfigError(GossipflError, ValueError):
    """The configuration or the command line is wrong."""


class StateError(GossipflError):
    """The state directory holds something missing, corrupt or unsafe."""


class MessageRefused(GossipflError, ValueError):
    """A peer's message is refused; nothing it carried was applied."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # True once the refused message's signature verified: only then may the
        # refusal be held against the sender it names (counted, answered in full).
        self.verified = False


class DecodeError(MessageRefused):
    """Bytes from a peer do not parse; ``offset`` is where parsing stopped."""

    def __init__(self, detail: str, offset: int) -> None:
        super().__init__("malformed", f"{detail} (at byte offset {offset})")
        self.offset = offset


class MeshError(GossipflError):
    """The WireGuard mesh, a namespace or discovery could not be set up."""
