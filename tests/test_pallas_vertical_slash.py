"""vertical_slash_attention (Pallas, interpret mode on CPU) and its index builder, against float64 numpy."""

import numpy as np
import pytest

import jax.numpy as jnp

from lcjax.pallas.vertical_slash_attention import (
    _pallas_forward, build_vertical_slash_index, vertical_slash_attention, vertical_slash_attention_reference)

from reference import TOL, assert_matches_reference, attention_f64


def pattern_mask(verticals, slashes, q_len):
    """numpy: key <= query and (key in verticals or query - key in slashes), per (batch, head)."""
    verticals, slashes = np.asarray(verticals), np.asarray(slashes)
    batch, heads = verticals.shape[:2]
    mask = np.zeros((batch, heads, q_len, q_len), bool)
    for b in range(batch):
        for h in range(heads):
            for c in verticals[b, h]:
                if 0 <= c < q_len:
                    mask[b, h, c:, c] = True
            for d in slashes[b, h]:
                if 0 <= d < q_len:
                    mask[b, h, np.arange(d, q_len), np.arange(0, q_len - d)] = True
    return mask


def visit_counts(index, q_len):
    """How many times the kernel's schedule counts each (query, key) pair, by replaying its three loops."""
    ix = {f: np.asarray(getattr(index, f)) for f in ("diag_plain", "diag_masked", "plain_counts", "masked_counts",
                                                    "column_indices", "column_counts", "is_vertical", "is_slash")}
    b_ = index.block
    batch, heads, nqb = ix["plain_counts"].shape
    padded = nqb * b_
    seen = np.zeros((batch, heads, padded, padded), np.int32)
    r, c = np.arange(b_)[:, None], np.arange(b_)[None, :]
    for b in range(batch):
        for h in range(heads):
            for qb in range(nqb):
                rows = slice(qb * b_, (qb + 1) * b_)
                for t in ix["diag_plain"][b, h, :ix["plain_counts"][b, h, qb]]:
                    seen[b, h, rows, (qb - t) * b_:(qb - t + 1) * b_] += 1
                for t in ix["diag_masked"][b, h, :ix["masked_counts"][b, h, qb]]:
                    off = t * b_ + r - c
                    ks = (qb - t) * b_
                    m = (off >= 0) & ((ix["is_slash"][b, h][np.maximum(off, 0)] != 0)
                                      | (ix["is_vertical"][b, h, ks:ks + b_] != 0)[None, :])
                    seen[b, h, rows, ks:ks + b_] += m
                for col in ix["column_indices"][b, h, qb, :ix["column_counts"][b, h, qb]]:
                    seen[b, h, rows, col] += np.arange(qb * b_, (qb + 1) * b_) >= col
    return seen[:, :, :q_len, :q_len]


def random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype, batch=1):
    def draw(h):
        return jnp.asarray(rng.standard_normal((batch, q_len, h, head_dim)) * 1.5, jnp.float32).astype(dtype)
    return draw(heads), draw(kv_heads), draw(kv_heads)


def random_pattern(rng, batch, heads, q_len, n_vertical, n_slash):
    """Random columns and offsets with duplicates and out-of-range values mixed in."""
    v = rng.integers(-3, q_len + 3, (batch, heads, n_vertical))
    s = rng.integers(-3, q_len + 3, (batch, heads, n_slash))
    if n_vertical > 1:
        v[..., 1] = v[..., 0]
    if n_slash > 1:
        s[..., 1] = s[..., 0]
    return jnp.asarray(v, jnp.int32), jnp.asarray(s, jnp.int32)


def nearest_diagonals(batch, heads, n_vertical, n_slash):
    """MInference's ideal case: the first columns and the nearest diagonals."""
    v = np.broadcast_to(np.arange(n_vertical), (batch, heads, n_vertical))
    s = np.broadcast_to(np.arange(n_slash), (batch, heads, n_slash))
    return jnp.asarray(v, jnp.int32), jnp.asarray(s, jnp.int32)


CASES = [  # q_len, heads, kv_heads, head_dim, dtype, block, n_vertical, n_slash, pattern
    (100, 4, 4, 64, jnp.float32, 16, 9, 7, "random"),
    (200, 8, 1, 128, jnp.bfloat16, 32, 20, 12, "random"),
    (170, 8, 2, 64, jnp.bfloat16, 16, 5, 70, "nearest"),
    (130, 4, 1, 64, jnp.float32, 32, 0, 6, "random"),
    (120, 4, 2, 128, jnp.float32, 16, 12, 0, "random"),
]


@pytest.mark.parametrize("q_len,heads,kv_heads,head_dim,dtype,block,n_vertical,n_slash,pattern", CASES)
def test_vertical_slash_matches_float64_reference(q_len, heads, kv_heads, head_dim, dtype, block, n_vertical,
                                                  n_slash, pattern):
    rng = np.random.default_rng(q_len * 7 + heads)
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype)
    if pattern == "random":
        verticals, slashes = random_pattern(rng, 1, heads, q_len, n_vertical, n_slash)
    else:
        verticals, slashes = nearest_diagonals(1, heads, n_vertical, n_slash)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    scale = head_dim ** -0.5
    out = vertical_slash_attention(q, k, v, index, scale=scale, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = pattern_mask(verticals, slashes, q_len)
    ref = attention_f64(q, k, v, mask, scale)
    assert_matches_reference(out, ref, mask, dtype)


@pytest.mark.parametrize("heads_fastest", [True, False])
def test_vertical_slash_kernel_writes_every_output_element(heads_fastest):
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 96, 4, 2, 64, jnp.bfloat16)
    verticals, slashes = random_pattern(rng, 1, 4, 96, 6, 5)
    index = build_vertical_slash_index(verticals, slashes, 96, 32, 32)
    poison = jnp.full(q.shape, jnp.nan, q.dtype)
    out = _pallas_forward(q, k, v, index, scale=0.125, interpret=True, num_warps=None, num_stages=None,
                          heads_fastest=heads_fastest, out_init=poison)
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = attention_f64(q, k, v, pattern_mask(verticals, slashes, 96), 0.125)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("pattern", ["random", "nearest", "dense_slashes"])
def test_index_counts_every_allowed_pair_exactly_once(pattern):
    rng = np.random.default_rng(6)
    q_len, block = 150, 16
    if pattern == "random":
        verticals, slashes = random_pattern(rng, 2, 3, q_len, 25, 20)
    elif pattern == "nearest":
        verticals, slashes = nearest_diagonals(2, 3, 10, 60)
    else:  # every offset a slash: all tiles below the diagonal are plain
        verticals, slashes = nearest_diagonals(2, 3, 4, q_len)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    np.testing.assert_array_equal(visit_counts(index, q_len), pattern_mask(verticals, slashes, q_len))
    if pattern != "random":
        assert np.asarray(index.plain_counts).max() > 0  # the unmasked path is exercised


def test_index_planted_vertical_line_and_diagonal():
    q_len, block = 128, 16
    verticals = jnp.asarray([[[40, 40, -1, 500]]], jnp.int32)  # one column, a duplicate, two out of range
    slashes = jnp.asarray([[[20]]], jnp.int32)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    seen = visit_counts(index, q_len)[0, 0]
    line = np.zeros((q_len, q_len), np.int32)
    line[40:, 40] = 1
    line[np.arange(20, q_len), np.arange(q_len - 20)] = 1
    np.testing.assert_array_equal(seen, line)
    # offset 20 crosses tile diagonals t = 1 and 2 only; column 40 is inside a slash tile for query block 3
    # (keys 32..47 at t = 1) and 4 (t = 2), a gathered column for the query blocks 2 and 5..7
    assert list(np.asarray(index.diag_masked)[0, 0, :2]) == [1, 2]
    assert list(np.asarray(index.column_counts)[0, 0]) == [0, 0, 1, 0, 0, 1, 1, 1]
    assert int(np.asarray(index.plain_counts).max()) == 0


def test_vertical_slash_xla_reference_matches_float64():
    rng = np.random.default_rng(7)
    q, k, v = random_inputs(rng, 90, 4, 2, 64, jnp.float32)
    verticals, slashes = random_pattern(rng, 1, 4, 90, 8, 8)
    out = vertical_slash_attention_reference(q, k, v, verticals, slashes, 0.125)
    ref = attention_f64(q, k, v, pattern_mask(verticals, slashes, 90), 0.125)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_vertical_slash_rejects_rectangular_tiles_and_mismatched_index():
    v = jnp.zeros((1, 2, 3), jnp.int32)
    with pytest.raises(ValueError, match="square tiles"):
        build_vertical_slash_index(v, v, 64, 32, 16)
    q = jnp.ones((1, 64, 2, 64), jnp.float32)
    index = build_vertical_slash_index(v, v, 32, 16, 16)
    with pytest.raises(ValueError, match="must agree"):
        vertical_slash_attention(q, q, q, index, scale=1.0, interpret=True)
