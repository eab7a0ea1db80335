"""Compression: top-k selection, unbiased quantization, edge cases, error feedback."""

import numpy as np
import pytest

from gossipfl.compress import (
    QMAX,
    Codec,
    CompressionSpec,
    compress,
    densify,
    top_k,
)
from gossipfl.errors import ConfigError

TOPK = [Codec.TOPK_INT8, Codec.TOPK_INT4]


def test_top_k_keeps_largest_magnitudes_including_negatives() -> None:
    delta = np.array([0.1, -9.0, 0.5, 3.0, -0.2, 0.0, 7.0, -4.0], dtype=np.float32)
    assert top_k(delta, 3).tolist() == [1, 6, 7]  # -9, 7, -4


def test_top_k_matches_a_full_sort_on_random_vectors() -> None:
    rng = np.random.default_rng(1)
    delta = rng.standard_normal(5000).astype(np.float32)
    chosen = top_k(delta, 50)
    expected = np.sort(np.argsort(-np.abs(delta), kind="stable")[:50])
    assert chosen.tolist() == expected.tolist()
    assert (delta[chosen] < 0).any(), "negative entries must be kept too"


def test_top_k_leaves_out_exact_zeros() -> None:
    delta = np.zeros(100, dtype=np.float32)
    delta[[3, 40]] = [1.0, -2.0]
    assert top_k(delta, 10).tolist() == [3, 40]


@pytest.mark.parametrize("codec", TOPK)
def test_quantizer_is_unbiased_and_error_shrinks_like_one_over_sqrt_t(
        codec: Codec) -> None:
    rng = np.random.default_rng(2)
    delta = rng.standard_normal(256).astype(np.float32)
    spec = CompressionSpec(codec, fraction=1.0, block=64)
    trials = {16: [], 1024: []}  # type: dict[int, list[float]]
    for t in trials:
        for _rep in range(8):
            total = np.zeros(256, dtype=np.float64)
            for _ in range(t):
                total += densify(compress(delta, spec, rng))
            trials[t].append(float(np.abs(total / t - delta).mean()))
    small, large = np.mean(trials[16]), np.mean(trials[1024])
    # 64x the trials: the mean error must fall about 8x (1/sqrt(T)); allow 5x..12x.
    assert 5.0 < small / large < 12.0, (small, large)
    # and one quantization never moves a value by more than one step
    single = compress(delta, spec, rng)
    per_entry = np.repeat(single.scales, 64)[:256]
    assert (np.abs(single.values - delta) <= per_entry * (1 + 1e-6)).all()


@pytest.mark.parametrize("codec", TOPK)
def test_all_zero_delta_decodes_to_zeros_not_nan(codec: Codec) -> None:
    out = compress(np.zeros(1000, dtype=np.float32), CompressionSpec(codec, 0.1),
                   np.random.default_rng(0))
    dense = densify(out)
    assert np.isfinite(dense).all() and not dense.any()


@pytest.mark.parametrize("codec", TOPK)
def test_an_all_zero_block_among_nonzero_blocks_has_scale_zero(codec: Codec) -> None:
    delta = np.zeros(256, dtype=np.float32)
    delta[:64] = 1.0
    out = compress(delta, CompressionSpec(codec, 1.0, block=64),
                   np.random.default_rng(0))
    assert np.isfinite(out.values).all()
    assert np.allclose(densify(out), delta)


@pytest.mark.parametrize("codec", TOPK)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-38, 1e-44])
def test_tiny_magnitude_blocks_stay_finite(codec: Codec, magnitude: float) -> None:
    rng = np.random.default_rng(3)
    delta = (rng.standard_normal(128) * magnitude).astype(np.float32)
    out = compress(delta, CompressionSpec(codec, 1.0, block=32), rng)
    assert np.isfinite(out.values).all()
    assert np.isfinite(out.scales).all()
    assert (np.abs(out.quantized) <= QMAX[codec]).all()


@pytest.mark.parametrize("codec", [*TOPK, Codec.DENSE_F32])
def test_error_feedback_identity_sent_plus_residual_is_what_was_meant(
        codec: Codec) -> None:
    """What a node meant to send equals what it sent plus the residual it keeps."""
    rng = np.random.default_rng(4)
    meant = rng.standard_normal(3000).astype(np.float32)
    out = compress(meant, CompressionSpec(codec, 0.05), rng)
    sent = densify(out)
    residual = meant - sent
    assert np.array_equal(sent + residual, meant)
    if codec is not Codec.DENSE_F32:
        # the residual is what the next exchange carries: it is not zero ...
        assert np.abs(residual).sum() > 0
        # ... and everything not selected is in it unchanged
        unsent = np.setdiff1d(np.arange(meant.size), out.indices)
        assert np.array_equal(residual[unsent], meant[unsent])


def test_error_feedback_transmits_everything_eventually() -> None:
    """Repeatedly compressing the residual drives it to zero: nothing is lost."""
    rng = np.random.default_rng(5)
    meant = rng.standard_normal(2000).astype(np.float32)
    known = np.zeros_like(meant)
    spec = CompressionSpec(Codec.TOPK_INT8, 0.05)
    for _ in range(200):
        known += densify(compress(meant - known, spec, rng))
    assert np.abs(meant - known).max() < 1e-3 * np.abs(meant).max()


def test_spec_rejects_bad_values_naming_them() -> None:
    with pytest.raises(ConfigError, match="topk_fraction 0"):
        CompressionSpec(Codec.TOPK_INT8, 0.0)
    with pytest.raises(ConfigError, match="block size 70000"):
        CompressionSpec(Codec.TOPK_INT8, 0.1, 70000)
    with pytest.raises(ConfigError, match="'zstd'"):
        CompressionSpec.from_name("zstd")
