"""Compressed gossip averaging with error feedback, one edge at a time.

The algorithm is CHOCO-Gossip / CHOCO-SGD (Koloskova, Stich, Jaggi, "Decentralized
Stochastic Optimization and Gossip Algorithms with Compressed Communication",
ICML 2019), run asynchronously over pairwise exchanges on a changing graph, the
setting analysed in Koloskova et al., "A Unified Theory of Decentralized SGD with
Changing Topology and Local Updates" (ICML 2020).

Naive way: send your model (or your last change) to a peer, compressed, and average.
Compression error then piles up in the models and they never agree.

Chosen way: for every edge (i, j) both ends keep the same two *public copies*:
``mine`` (what j believes of x_i) and ``theirs`` (what i believes of x_j). An
exchange initiated by i:

1. i sends ``q_i = Q(x_i - mine)``; j adds it to its ``theirs``.
2. j replies ``q_j = Q(x_j - mine_j)`` and adds it to its ``mine``; i does the same
   to its own copies once the reply verifies, so the copies stay equal on both ends.
3. both step toward each other: ``x_i += g/2 (theirs - mine)`` and
   ``x_j += g/2 (theirs_j - mine_j)``, with ``g`` the consensus step size.

The two steps are exact negatives of each other in floating point, so an exchange
leaves ``x_i + x_j`` unchanged (up to the rounding of the two additions), whatever
the compression: averaging preserves the mean. What Q drops is not lost but stays in
``x - mine`` (the residual) and is sent later: error feedback. With ``Q`` the
identity and ``g = 1`` an exchange is exact pairwise averaging. The stochastic
rounding inside Q is seeded by the edge's (epoch, seq), which both ends share, so
identical models stay bit-identical after an exchange.

Every edge starts with both copies equal to the shared initial model x0 (its hash is
in the manifest), so the first compressed message is already cheap. ``epoch``/``seq``
count exchanges on the edge; a message whose counters do not match is refused and
changes nothing, which is what makes a replay harmless. An edge that lost sync (a
reply lost in transit, a node restored from an older checkpoint) is restarted by the
initiator with a dense RESET exchange at a higher epoch: both copies are then set to
the two models exactly.

Left out on purpose: a single public copy per node broadcast to all neighbours (the
paper's form). It needs every neighbour to receive every message; per-edge copies
cost two vectors per active edge (bounded by ``max_edges``) and tolerate peers that
come and go.

Thread safety: a ``GossipEngine`` is not locked. The node calls it from one worker
thread at a time, holding the model lock, and marks edges busy across the network
wait so that one edge has one exchange in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .codec import (
    FLAG_RESET,
    Header,
    Kind,
    dense_message_bytes,
    encode_message,
    max_message_bytes,
    parse_header,
    verify_signature,
)
from .compress import F32, Codec, Compressed, CompressionSpec, compress
from .errors import ConfigError, MessageRefused
from .identity import Identity, short_id
from .merge import MergeFn

log = logging.getLogger(__name__)

DENSE = CompressionSpec(Codec.DENSE_F32, 1.0)

MAX_COUNTER = 2**32 - 1  # epoch and seq are 32-bit on the wire
EPOCH_HINT_WINDOW = 1 << 16  # how far above ours a peer's claimed epoch may be


@dataclass
class Edge:
    """The state both ends of an edge keep in step."""

    peer: bytes
    mine: F32
    theirs: F32
    epoch: int = 0
    seq: int = 0
    busy: bool = False
    reset_epoch: int | None = None  # set when the next exchange must be a reset
    last_used: float = 0.0


@dataclass
class Pending:
    """An exchange this node started and has not yet seen the reply to."""

    peer: bytes
    edge: Edge
    epoch: int
    seq: int
    reset: bool
    sent: Compressed
    request: bytes


@dataclass
class ExchangeCounts:
    """Bytes and outcomes of one peer, for status."""

    bytes_out: int = 0
    bytes_in: int = 0
    dense_equivalent_out: int = 0
    exchanges: int = 0
    last_exchange: float = 0.0
    last_round: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def edge_rng(epoch: int, seq: int) -> np.random.Generator:
    """The rounding noise of one exchange: both ends draw the same."""
    return np.random.default_rng([epoch, seq])


class GossipEngine:
    """Protocol state of one node: its edges, counters and the model step."""

    def __init__(self, identity: Identity, model: F32, x0: F32, manifest: bytes,
                 spec: CompressionSpec, step_size: float, merge: MergeFn,
                 *, max_edges: int = 32, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0.0 < step_size <= 1.0:
            raise ConfigError(f"consensus_step {step_size} is outside (0, 1]")
        if max_edges < 1:
            raise ConfigError(f"max_edges {max_edges} must be at least 1")
        self.identity = identity
        self.model = model
        self.x0 = x0.copy()
        self.manifest = manifest
        self.spec = spec
        self.half_step = np.float32(step_size / 2.0)
        self.merge = merge
        self.max_edges = max_edges
        self.max_bytes = min(max_bytes or math.inf, max_message_bytes(model.size))
        self.clock = clock
        self.edges: OrderedDict[bytes, Edge] = OrderedDict()
        self.counts: dict[bytes, ExchangeCounts] = {}
        self.round = 0
        self.model_version = 0

    # --- edges ------------------------------------------------------------------

    def edge(self, peer: bytes) -> Edge:
        """The edge to ``peer``, fresh (copies = x0) if there is none."""
        edge = self.edges.get(peer)
        if edge is None:
            self._evict()
            edge = Edge(peer, self.x0.copy(), self.x0.copy())
            self.edges[peer] = edge
        self.edges.move_to_end(peer)
        return edge

    def _evict(self) -> None:
        while len(self.edges) >= self.max_edges:
            for peer, edge in self.edges.items():
                if not edge.busy:
                    del self.edges[peer]
                    log.info("%s edge dropped to stay within max_edges %d",
                             short_id(peer), self.max_edges)
                    break
            else:
                return

    def counts_for(self, peer: bytes) -> ExchangeCounts:
        return self.counts.setdefault(peer, ExchangeCounts())

    # --- initiator ----------------------------------------------------------------

    def start(self, peer: bytes) -> Pending | None:
        """Build the request of an exchange with ``peer``; None if the edge is busy."""
        edge = self.edge(peer)
        if edge.busy:
            return None
        reset = edge.reset_epoch is not None
        epoch, seq = (edge.reset_epoch or 0, 0) if reset else (edge.epoch, edge.seq)
        sent = self._compress(edge, reset, epoch, seq)
        request = encode_message(self.identity, sent, kind=Kind.REQUEST,
                                 receiver=peer, round=self.round, epoch=epoch,
                                 seq=seq, manifest=self.manifest,
                                 flags=FLAG_RESET if reset else 0)
        edge.busy = True
        self._count_out(peer, sent, len(request))
        return Pending(peer, edge, epoch, seq, reset, sent, request)

    def finish(self, pending: Pending, response: bytes) -> None:
        """Apply a verified reply; refuses (and changes nothing) if it is bad."""
        edge = pending.edge
        try:
            header = self._check(response, Kind.RESPONSE, expect_sender=pending.peer)
            if (header.epoch, header.seq, header.reset) != (
                    pending.epoch, pending.seq, pending.reset):
                raise MessageRefused("out-of-sync",
                                     f"reply is for epoch {header.epoch} seq "
                                     f"{header.seq}, asked {pending.epoch}/"
                                     f"{pending.seq}")
            theirs = self._base(edge.theirs, pending.reset)
            self.merge(theirs, [(response, header)], [1.0])
            mine = self._base(edge.mine, pending.reset)
            _add(mine, pending.sent)
            self._commit(edge, mine, theirs, header)
        except MessageRefused:
            # The peer applied our request but we refuse its reply: out of step.
            self.abort(pending, None)
            raise
        finally:
            edge.busy = False
        self.counts_for(pending.peer).bytes_in += len(response)

    def abort(self, pending: Pending, refusal: MessageRefused | None,
              peer_epoch: int | None = None) -> None:
        """The exchange failed; decide whether the edge must restart."""
        edge = pending.edge
        edge.busy = False
        if refusal is None or refusal.reason in ("out-of-sync", "replay"):
            # Unknown outcome (timeout, lost reply) or counters disagree: the peer
            # may have applied our message. Restart the edge from exact copies,
            # at an epoch above both ends' committed ones. The peer's epoch comes
            # in an unsigned refusal: take it only within a window of ours, so a
            # forged one cannot exhaust the 32-bit counter.
            hint = peer_epoch or 0
            if hint - edge.epoch >= EPOCH_HINT_WINDOW:
                log.warning("%s claims edge epoch %d, far above ours (%d); "
                            "ignoring the claim", short_id(edge.peer), hint,
                            edge.epoch)
                hint = 0
            edge.reset_epoch = min(max(edge.epoch, hint) + 1, MAX_COUNTER)

    # --- responder ----------------------------------------------------------------

    def check_request(self, request: bytes, is_member: Callable[[bytes], bool]
                      ) -> Header:
        """Every check of a request that needs no edge or model state.

        Thread safe and lock free (it reads only the identity, manifest and
        dimension), so the node runs it before taking the model lock: garbage and
        forgeries never wait for, or hold up, training.
        """
        return self._check(request, Kind.REQUEST, is_member=is_member)

    def respond(self, request: bytes, is_member: Callable[[bytes], bool],
                header: Header | None = None) -> bytes:
        """Handle one request and return the signed reply; refuse on any fault.

        ``header`` is ``check_request``'s result when the caller ran it already.
        """
        if header is None:
            header = self.check_request(request, is_member)
        try:
            return self._respond(request, header)
        except MessageRefused as exc:
            exc.verified = True
            raise

    def _respond(self, request: bytes, header: Header) -> bytes:
        edge = self.edge(header.sender)
        self._check_counters(edge, header)
        if edge.busy:
            raise MessageRefused("edge-busy",
                                 "an exchange on this edge is already in flight")
        edge.busy = True
        try:
            theirs = self._base(edge.theirs, header.reset)
            self.merge(theirs, [(request, header)], [1.0])
            sent = self._compress(edge, header.reset, header.epoch, header.seq)
            mine = self._base(edge.mine, header.reset)
            _add(mine, sent)
            reply = encode_message(self.identity, sent, kind=Kind.RESPONSE,
                                   receiver=header.sender, round=self.round,
                                   epoch=header.epoch, seq=header.seq,
                                   manifest=self.manifest, flags=header.flags)
            self._commit(edge, mine, theirs, header)
        finally:
            edge.busy = False
        self._count_out(header.sender, sent, len(reply))
        self.counts_for(header.sender).bytes_in += len(request)
        return reply

    def _check_counters(self, edge: Edge, header: Header) -> None:
        if header.reset:
            if header.epoch <= edge.epoch:
                raise MessageRefused("replay",
                                     f"reset to epoch {header.epoch} but the edge is "
                                     f"at epoch {edge.epoch}")
            return
        got, want = (header.epoch, header.seq), (edge.epoch, edge.seq)
        if got < want:
            raise MessageRefused("replay", f"epoch/seq {got[0]}/{got[1]} is behind "
                                 f"the edge's {want[0]}/{want[1]}")
        if got != want:
            raise MessageRefused("out-of-sync", f"epoch/seq {got[0]}/{got[1]} is "
                                 f"ahead of the edge's {want[0]}/{want[1]}")

    # --- shared steps -------------------------------------------------------------

    def _check(self, data: bytes, kind: Kind, *, expect_sender: bytes | None = None,
               is_member: Callable[[bytes], bool] | None = None) -> Header:
        header = parse_header(data, int(self.max_bytes))
        if header.kind is not kind:
            raise MessageRefused("wrong-kind", f"expected a {kind.name.lower()}, got "
                                 f"a {header.kind.name.lower()}")
        if header.sender == self.identity.public_key:
            # Only a holder of our own key can sign this: verify first, so that
            # nobody can make us report a duplicate by claiming our key.
            verify_signature(data, header)
            refusal = MessageRefused("own-identity",
                                     "a message signed with this node's own "
                                     "identity: another box runs a copy of it")
            refusal.verified = True
            raise refusal
        if expect_sender is not None and header.sender != expect_sender:
            raise MessageRefused("unknown-sender",
                                 f"reply from {short_id(header.sender)}, expected "
                                 f"{short_id(expect_sender)}")
        if is_member is not None and not is_member(header.sender):
            raise MessageRefused("unknown-sender",
                                 f"{short_id(header.sender)} is not a member")
        verify_signature(data, header)
        try:
            self._check_verified(header)
        except MessageRefused as exc:
            exc.verified = True
            raise
        return header

    def _check_verified(self, header: Header) -> None:
        if header.receiver != self.identity.public_key:
            raise MessageRefused("not-for-us",
                                 f"addressed to {short_id(header.receiver)}")
        if header.manifest != self.manifest:
            raise MessageRefused("manifest-mismatch",
                                 f"model manifest {header.manifest.hex()} is not "
                                 f"ours ({self.manifest.hex()}): another model or "
                                 "task")
        if header.dim != self.model.size:
            raise MessageRefused("dimension-mismatch",
                                 f"dimension {header.dim} is not the model's "
                                 f"{self.model.size}")
        if header.reset and header.codec is not Codec.DENSE_F32:
            raise MessageRefused("malformed", "a reset must be dense")

    def _compress(self, edge: Edge, reset: bool, epoch: int, seq: int
                  ) -> Compressed:
        if reset:
            return compress(self.model, DENSE, edge_rng(epoch, seq))
        gap: F32 = self.model - edge.mine
        return compress(gap, self.spec, edge_rng(epoch, seq))

    @staticmethod
    def _base(copy: F32, reset: bool) -> F32:
        return np.zeros_like(copy) if reset else copy.copy()

    def _commit(self, edge: Edge, mine: F32, theirs: F32, header: Header) -> None:
        with np.errstate(over="ignore", invalid="ignore"):
            step: F32 = self.half_step * (theirs - mine)
            moved: F32 = self.model + step
        if not np.isfinite(moved).all():
            raise MessageRefused("non-finite", "the merged model would not be finite")
        self.model[:] = moved
        edge.mine, edge.theirs = mine, theirs
        edge.epoch, edge.seq = header.epoch, header.seq + 1
        edge.reset_epoch = None
        if edge.seq >= MAX_COUNTER:  # about 4e9 exchanges: start a new epoch
            edge.reset_epoch = min(edge.epoch + 1, MAX_COUNTER)
        edge.last_used = self.clock()
        self.model_version += 1
        counts = self.counts_for(edge.peer)
        counts.exchanges += 1
        counts.last_exchange = edge.last_used
        counts.last_round = header.round

    def _count_out(self, peer: bytes, sent: Compressed, size: int) -> None:
        counts = self.counts_for(peer)
        counts.bytes_out += size
        counts.dense_equivalent_out += dense_message_bytes(sent.dim)

    def refused(self, peer: bytes, reason: str) -> None:
        refused = self.counts_for(peer).refused
        refused[reason] = refused.get(reason, 0) + 1


def _add(copy: F32, sent: Compressed) -> None:
    """``copy += sent`` with the same float32 operations as the merge kernel."""
    if sent.codec is Codec.DENSE_F32:
        copy += sent.values
    else:
        copy[sent.indices] += sent.values
