"""Dense attention against a float64 numpy reference: GQA, causal, sliding window, ragged lengths, chunks."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_f64

from lcjax.cache import KVCache
from lcjax.models.attention import AttentionMeta, DenseAttention
from lcjax.numerics import attention_mask, xla_attention


def loop_mask(q_slots, kv_len, lengths, window, heads):
    """bool [b, h, q, kv] built by explicit loops: causal by slot, within lengths, inside the window."""
    b, sq = q_slots.shape
    m = np.zeros((b, heads, sq, kv_len), bool)
    for bi in range(b):
        for i in range(sq):
            for j in range(kv_len):
                m[bi, :, i, j] = (
                    j <= q_slots[bi, i] and j < lengths[bi] and (window is None or q_slots[bi, i] - j < window)
                )
    return m


@pytest.mark.parametrize(
    "heads,kv_heads,window,q_chunk", [(4, 4, None, 1024), (8, 2, None, 5), (8, 1, 6, 1024), (4, 2, 3, 7)]
)
def test_xla_attention_matches_float64_reference(heads, kv_heads, window, q_chunk):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, s, d = 2, 19, 16
    q = rng.standard_normal((b, s, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
    lengths = np.array([s, 11], np.int32)
    slots = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    mask = attention_mask(jnp.asarray(slots), s, jnp.asarray(lengths), window)
    out = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, d**-0.5, q_chunk=q_chunk)
    ref = attention_f64(q, k, v, loop_mask(slots, s, lengths, window, heads), d**-0.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-4)


def test_rows_with_no_visible_key_are_zero_not_nan():
    q = jnp.ones((1, 3, 2, 8))
    k = jnp.ones((1, 3, 2, 8))
    mask = jnp.zeros((1, 3, 3), bool)
    out = xla_attention(q, k, k, mask, 1.0)
    assert not np.isnan(np.asarray(out)).any()
    assert np.all(np.asarray(out) == 0)


def test_extend_over_cache_equals_one_prefill():
    """Writing a prompt in two calls (prefill, then extend over the cache) gives the same outputs."""
    rng = np.random.default_rng(3)
    b, s, h, kvh, d, split = 2, 12, 4, 2, 8, 7
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kvh, kvh))
    attn = DenseAttention("xla")
    full_meta = AttentionMeta(
        layer=jnp.int32(0),
        q_positions=jnp.zeros((b, s), jnp.int32),
        start=jnp.zeros((b,), jnp.int32),
        lengths=jnp.full((b,), s, jnp.int32),
        phase="prefill",
        scale=d**-0.5,
    )
    full, _ = attn(q, k, v, None, full_meta)
    cache = KVCache.init(1, b, s, kvh, d, jnp.float32)
    m1 = AttentionMeta(
        layer=jnp.int32(0),
        q_positions=jnp.zeros((b, split), jnp.int32),
        start=jnp.zeros((b,), jnp.int32),
        lengths=jnp.full((b,), split, jnp.int32),
        phase="prefill",
        scale=d**-0.5,
    )
    first, cache = attn(q[:, :split], k[:, :split], v[:, :split], cache, m1)
    m2 = AttentionMeta(
        layer=jnp.int32(0),
        q_positions=jnp.zeros((b, s - split), jnp.int32),
        start=jnp.full((b,), split, jnp.int32),
        lengths=jnp.full((b,), s, jnp.int32),
        phase="extend",
        scale=d**-0.5,
    )
    second, cache = attn(q[:, split:], k[:, split:], v[:, split:], cache, m2)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.k[0]), np.asarray(k))


def test_extend_without_cache_is_a_clear_error():
    meta = AttentionMeta(
        layer=jnp.int32(0),
        q_positions=jnp.zeros((1, 1), jnp.int32),
        start=jnp.zeros((1,), jnp.int32),
        lengths=jnp.ones((1,), jnp.int32),
        phase="extend",
    )
    x = jnp.ones((1, 1, 1, 4))
    with pytest.raises(ValueError, match="cache is None"):
        DenseAttention("xla")(x, x, x, None, meta)
