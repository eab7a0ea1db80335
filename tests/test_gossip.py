"""The exchange protocol on in-process engines: invariants, replays, resets."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from gossipfl import checkpoint
from gossipfl.compress import Codec, CompressionSpec
from gossipfl.errors import MessageRefused, StateError
from gossipfl.gossip import GossipEngine
from gossipfl.identity import Identity
from gossipfl.merge import merge_numpy
from gossipfl.train import FlatModel

MANIFEST = b"\x01" * 16
INT8 = CompressionSpec(Codec.TOPK_INT8, 0.1)
DENSE = CompressionSpec(Codec.DENSE_F32, 1.0)


def engines(n: int, dim: int = 500, spec: CompressionSpec = INT8, step: float = 0.5,
            same: bool = False, seed: int = 0) -> list[GossipEngine]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(dim).astype(np.float32)
    out = []
    for i in range(n):
        model = x0.copy() if same else (x0 + rng.standard_normal(dim)).astype(
            np.float32)
        identity = Identity.from_seed(bytes([i + 1]) * 32)
        out.append(GossipEngine(identity, model, x0, MANIFEST, spec, step,
                                merge_numpy))
    return out


def member(_: bytes) -> bool:
    return True


def exchange(a: GossipEngine, b: GossipEngine) -> None:
    pending = a.start(b.identity.public_key)
    assert pending is not None
    a.finish(pending, b.respond(pending.request, member))


@pytest.mark.parametrize("spec,step", [(INT8, 0.5), (DENSE, 1.0),
                                       (CompressionSpec(Codec.TOPK_INT4, 0.02), 0.3)])
def test_exchanges_preserve_the_sum_of_the_models(spec: CompressionSpec,
                                                  step: float) -> None:
    nodes = engines(5, spec=spec, step=step)
    before = np.sum([n.model.astype(np.float64) for n in nodes], axis=0)
    rng = np.random.default_rng(1)
    for _ in range(200):
        i, j = rng.choice(5, 2, replace=False)
        exchange(nodes[i], nodes[j])
    after = np.sum([n.model.astype(np.float64) for n in nodes], axis=0)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4)
    # ... while the models did move towards each other
    spread = np.std([n.model for n in nodes], axis=0).mean()
    assert spread < 0.5


def test_each_exchange_moves_both_ends_by_exact_opposites() -> None:
    a, b = engines(2)
    xa, xb = a.model.copy(), b.model.copy()
    exchange(a, b)
    np.testing.assert_allclose(a.model - xa, -(b.model - xb), rtol=0, atol=1e-6)
    assert np.abs(a.model - xa).sum() > 0


def test_dense_exchange_with_step_one_is_exact_pairwise_averaging() -> None:
    a, b = engines(2, spec=DENSE, step=1.0)
    mean = (a.model.astype(np.float64) + b.model) / 2
    exchange(a, b)
    np.testing.assert_allclose(a.model, mean, atol=1e-6)
    np.testing.assert_allclose(b.model, mean, atol=1e-6)


def test_both_ends_keep_identical_public_copies() -> None:
    a, b = engines(2)
    for _ in range(5):
        exchange(a, b)
        exchange(b, a)
    ea, eb = a.edges[b.identity.public_key], b.edges[a.identity.public_key]
    assert np.array_equal(ea.mine, eb.theirs) and np.array_equal(ea.theirs, eb.mine)
    assert (ea.epoch, ea.seq) == (eb.epoch, eb.seq) == (0, 10)


def test_three_bit_identical_nodes_stay_bit_identical_after_a_compressed_round(
        ) -> None:
    nodes = engines(3, same=True)
    drift = np.random.default_rng(2).standard_normal(500).astype(np.float32)
    for n in nodes:  # the same local training step on each
        n.model += drift
    exchange(nodes[0], nodes[1])
    exchange(nodes[1], nodes[2])
    exchange(nodes[2], nodes[0])
    assert nodes[0].model.tobytes() == nodes[1].model.tobytes() \
        == nodes[2].model.tobytes()


def test_compressed_gossip_reaches_consensus() -> None:
    nodes = engines(6)
    rng = np.random.default_rng(3)
    spread0 = np.std([n.model for n in nodes], axis=0).mean()
    for _ in range(600):
        i, j = rng.choice(6, 2, replace=False)
        exchange(nodes[i], nodes[j])
    spread = np.std([n.model for n in nodes], axis=0).mean()
    assert spread < 0.05 * spread0


def snapshot(e: GossipEngine) -> tuple[bytes, list[tuple[int, int, bytes, bytes]]]:
    return e.model.tobytes(), [(x.epoch, x.seq, x.mine.tobytes(), x.theirs.tobytes())
                               for x in e.edges.values()]


def test_a_replayed_request_is_refused_and_changes_nothing() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    a.finish(pending, b.respond(pending.request, member))
    before = snapshot(b)
    with pytest.raises(MessageRefused) as info:
        b.respond(pending.request, member)
    assert info.value.reason == "replay"
    assert snapshot(b) == before


def test_a_lost_reply_is_healed_by_a_dense_reset() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    b.respond(pending.request, member)  # b applied; the reply never arrives
    a.abort(pending, None)
    pending = a.start(b.identity.public_key)
    assert pending is not None and pending.reset
    a.finish(pending, b.respond(pending.request, member))
    ea, eb = a.edges[b.identity.public_key], b.edges[a.identity.public_key]
    assert np.array_equal(ea.mine, eb.theirs) and np.array_equal(ea.theirs, eb.mine)
    assert ea.epoch == eb.epoch == 1 and ea.reset_epoch is None
    exchange(b, a)  # and the edge works normally again, in both directions
    exchange(a, b)


def test_a_node_behind_its_peer_is_told_and_resets() -> None:
    a, b = engines(2)
    exchange(a, b)
    stale = snapshot(a)
    exchange(a, b)
    # restore a's edge to the older state, as from an old checkpoint
    edge = a.edges[b.identity.public_key]
    edge.seq = stale[1][0][1]
    pending = a.start(b.identity.public_key)
    assert pending is not None
    with pytest.raises(MessageRefused) as info:
        b.respond(pending.request, member)
    assert info.value.reason == "replay"
    a.abort(pending, info.value, b.edges[a.identity.public_key].epoch)
    exchange(a, b)
    assert a.edges[b.identity.public_key].epoch == 1


def test_a_replayed_reset_is_refused() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    a.abort(pending, None)
    reset = a.start(b.identity.public_key)
    assert reset is not None and reset.reset
    a.finish(reset, b.respond(reset.request, member))
    before = snapshot(b)
    with pytest.raises(MessageRefused) as info:
        b.respond(reset.request, member)
    assert info.value.reason == "replay"
    assert snapshot(b) == before


def test_a_busy_edge_refuses_a_second_exchange() -> None:
    a, b = engines(2)
    mine = b.start(a.identity.public_key)  # b's own exchange with a is in flight
    assert mine is not None
    pending = a.start(b.identity.public_key)
    assert pending is not None
    before = snapshot(b)
    with pytest.raises(MessageRefused) as info:
        b.respond(pending.request, member)
    assert info.value.reason == "edge-busy"
    assert snapshot(b) == before


@pytest.mark.parametrize("reason", ["unknown-sender", "not-for-us",
                                    "manifest-mismatch", "own-identity"])
def test_misaddressed_or_foreign_requests_are_refused(reason: str) -> None:
    a, b, c = engines(3)
    target = c if reason == "not-for-us" else b
    if reason == "manifest-mismatch":
        a.manifest = b"\x02" * 16
    if reason == "own-identity":
        a.identity = b.identity
    pending = a.start(target.identity.public_key)
    assert pending is not None
    before = snapshot(b)
    with pytest.raises(MessageRefused) as info:
        b.respond(pending.request, lambda key: reason != "unknown-sender")
    assert info.value.reason == reason
    assert snapshot(b) == before


def test_a_bad_reply_leaves_the_initiator_unchanged_and_schedules_a_reset() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    reply = bytearray(b.respond(pending.request, member))
    reply[-1] ^= 1
    before = a.model.tobytes()
    with pytest.raises(MessageRefused, match="bad-signature"):
        a.finish(pending, bytes(reply))
    assert a.model.tobytes() == before
    assert a.edges[b.identity.public_key].reset_epoch == 1


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_a_batchnorm_model_merges_and_keeps_its_integer_counter_local() -> None:
    flats = []
    for _ in range(2):
        torch.manual_seed(0)
        flats.append(FlatModel(BatchNormNet(), "bn-test"))
    assert flats[0].manifest == flats[1].manifest
    names = [e.name for e in flats[0].entries]
    assert "bn.running_mean" in names and "bn.running_var" in names
    assert "bn.num_batches_tracked" not in names
    # train each on different data so params and running stats differ
    for i, flat in enumerate(flats):
        opt = torch.optim.SGD(flat.model.parameters(), lr=0.1)
        flat.model.train()
        for _ in range(3 + i):
            x = torch.randn(16, 6) + i
            loss = flat.model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    x0 = FlatModel(BatchNormNet(), "bn-test").vector
    ids = [Identity.generate() for _ in flats]
    a, b = (GossipEngine(ids[i], flats[i].vector, x0, flats[0].manifest, DENSE,
                         1.0, merge_numpy) for i in range(2))
    mean_rm = (flats[0].model.bn.running_mean + flats[1].model.bn.running_mean) / 2
    exchange(a, b)
    for flat in flats:  # the live torch buffers saw the merge
        torch.testing.assert_close(flat.model.bn.running_mean, mean_rm)
        assert flat.model.bn.num_batches_tracked.dtype == torch.int64
    assert int(flats[0].model.bn.num_batches_tracked) == 3
    assert int(flats[1].model.bn.num_batches_tracked) == 4
    flats[0].model.eval()
    assert torch.isfinite(flats[0].model(torch.randn(4, 6))).all()


def test_checkpoint_round_trip_restores_model_and_edges(tmp_path) -> None:
    a, b = engines(2)
    for _ in range(3):
        exchange(a, b)
    a.round = 42
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, a)
    fresh = engines(2)[0]
    assert checkpoint.restore(path, fresh)
    assert snapshot(fresh) == snapshot(a) and fresh.round == 42


def test_a_corrupt_checkpoint_is_refused_and_left_in_place(tmp_path) -> None:
    a = engines(1)[0]
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, a)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    path.write_bytes(bytes(data))
    before = a.model.tobytes()
    with pytest.raises(StateError, match="checkpoint"):
        checkpoint.restore(path, a)
    assert path.read_bytes() == bytes(data)
    assert a.model.tobytes() == before


def test_a_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    a = engines(1)[0]
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, a)
    a.manifest = b"\x09" * 16
    with pytest.raises(StateError, match="manifest"):
        checkpoint.restore(path, a)


def rewrite_checkpoint(path, meta=None, drop=(), meta_bytes=None,
                       **replace) -> None:
    """Rewrite a saved checkpoint with some of its content changed."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key not in drop}
    if meta is not None:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if meta_bytes is not None:
        arrays["meta"] = meta_bytes
    arrays.update(replace)
    with open(path, "wb") as out:
        np.savez(out, **arrays)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def saved_meta(path) -> dict:
    with np.load(path) as data:
        return json.loads(data["meta"].tobytes())


def with_edge(path, **change) -> dict:
    meta = saved_meta(path)
    meta["edges"][0].update(change)
    return meta


def without(meta: dict, key: str) -> dict:
    return {k: v for k, v in meta.items() if k != key}


BAD_CHECKPOINTS = {
    "empty file": lambda p: p.write_bytes(b""),
    "an .npy": lambda p: p.write_bytes(npy_bytes(np.zeros(3))),
    "no model": lambda p: rewrite_checkpoint(p, drop=("model",)),
    "no meta": lambda p: rewrite_checkpoint(p, drop=("meta",)),
    "meta a list": lambda p: rewrite_checkpoint(p, meta=[1, 2]),
    "meta not json": lambda p: rewrite_checkpoint(
        p, meta_bytes=np.frombuffer(b"\xff{", dtype=np.uint8)),
    "no edges": lambda p: rewrite_checkpoint(p, meta=without(saved_meta(p), "edges")),
    "round x": lambda p: rewrite_checkpoint(p, meta={**saved_meta(p), "round": "x"}),
    "round -1": lambda p: rewrite_checkpoint(p, meta={**saved_meta(p), "round": -1}),
    "no model_version": lambda p: rewrite_checkpoint(
        p, meta=without(saved_meta(p), "model_version")),
    "peer zz": lambda p: rewrite_checkpoint(p, meta=with_edge(p, peer="zz")),
    "short peer": lambda p: rewrite_checkpoint(p, meta=with_edge(p, peer="ab")),
    "edge a list": lambda p: rewrite_checkpoint(
        p, meta={**saved_meta(p), "edges": [[1]]}),
    "reset_epoch -1": lambda p: rewrite_checkpoint(
        p, meta=with_edge(p, reset_epoch=-1)),
    "reset_epoch 2**32-1": lambda p: rewrite_checkpoint(
        p, meta=with_edge(p, reset_epoch=2**32 - 1)),
    "reset_epoch text": lambda p: rewrite_checkpoint(
        p, meta=with_edge(p, reset_epoch="3")),
    "epoch 1.5": lambda p: rewrite_checkpoint(p, meta=with_edge(p, epoch=1.5)),
    "epoch 2**32": lambda p: rewrite_checkpoint(p, meta=with_edge(p, epoch=2**32)),
    "epoch true": lambda p: rewrite_checkpoint(p, meta=with_edge(p, epoch=True)),
    "seq -5": lambda p: rewrite_checkpoint(p, meta=with_edge(p, seq=-5)),
    "seq missing": lambda p: rewrite_checkpoint(p, meta=with_edge(p, seq=None)),
    "no mine_0": lambda p: rewrite_checkpoint(p, drop=("mine_0",)),
    "model nan": lambda p: rewrite_checkpoint(
        p, model=np.full(500, np.nan, dtype=np.float32)),
    "model inf": lambda p: rewrite_checkpoint(
        p, model=np.r_[np.float32(np.inf), np.zeros(499, np.float32)]),
    "theirs nan": lambda p: rewrite_checkpoint(
        p, theirs_0=np.full(500, np.nan, dtype=np.float32)),
    "model float64": lambda p: rewrite_checkpoint(p, model=np.zeros(500)),
}


@pytest.mark.parametrize("damage", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_before_anything_is_applied(tmp_path,
                                                                damage) -> None:
    a, b = engines(2)
    exchange(a, b)
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, a)
    BAD_CHECKPOINTS[damage](path)
    on_disk = path.read_bytes()
    fresh = engines(2)[0]
    before = snapshot(fresh), fresh.round, fresh.model_version

    with pytest.raises(StateError) as caught:
        checkpoint.restore(path, fresh)

    message = str(caught.value)
    assert str(path) in message and "move it away to start from scratch" in message
    assert (snapshot(fresh), fresh.round, fresh.model_version) == before
    assert path.read_bytes() == on_disk


def test_claiming_our_own_key_without_it_is_a_bad_signature_not_a_duplicate(
        ) -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    forged = bytearray(pending.request)
    forged[8:40] = b.identity.public_key  # claims to be b, signed by a
    with pytest.raises(MessageRefused) as info:
        b.respond(bytes(forged), member)
    assert info.value.reason == "bad-signature"


def test_a_forged_huge_epoch_hint_cannot_break_the_edge() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    a.abort(pending, MessageRefused("replay", "forged"), peer_epoch=2**32 - 1)
    reset = a.start(b.identity.public_key)  # would overflow the 32-bit field
    assert reset is not None and reset.reset and reset.epoch == 1
    a.finish(reset, b.respond(reset.request, member))
    exchange(a, b)


def test_epoch_hints_within_the_window_are_followed() -> None:
    a, b = engines(2)
    pending = a.start(b.identity.public_key)
    assert pending is not None
    a.abort(pending, MessageRefused("replay", "behind"), peer_epoch=7)
    reset = a.start(b.identity.public_key)
    assert reset is not None and reset.epoch == 8
