"""Split-K decode attention (Pallas: interpret mode on CPU, compiled on a GPU) against float64 numpy, on ragged
cache lengths."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import INTERPRET, assert_matches_reference, attention_f64

from lcjax.pallas.decode_attention import decode_attention, decode_attention_reference

CASES = [  # batch, capacity, heads, kv_heads, head_dim, dtype, block_k, num_splits
    (3, 200, 8, 2, 64, jnp.float32, 32, None),
    (2, 130, 8, 1, 128, jnp.bfloat16, 32, 3),
    (4, 96, 4, 4, 64, jnp.float32, 16, 8),  # more splits than some sequences have keys: empty splits
    (2, 70, 8, 8, 96, jnp.float16, 16, 1),
]


@pytest.mark.parametrize("batch,capacity,heads,kv_heads,head_dim,dtype,block_k,num_splits", CASES)
def test_decode_attention_matches_float64_on_ragged_lengths(
    batch, capacity, heads, kv_heads, head_dim, dtype, block_k, num_splits
):
    rng = np.random.default_rng(109)
    q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)) * 1.5, jnp.float32).astype(dtype)
    k, v = (
        jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)) * 1.5, jnp.float32).astype(dtype)
        for _ in range(2)
    )
    lengths = rng.integers(1, capacity + 1, batch)
    lengths[0] = capacity  # a full cache
    if batch > 2:
        lengths[1] = 0  # an empty one: zeros, never NaN
    lengths = jnp.asarray(lengths, jnp.int32)
    scale = head_dim**-0.5
    out = decode_attention(q, k, v, lengths, scale=scale, block_k=block_k, num_splits=num_splits, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = np.zeros((batch, heads, 1, capacity), bool)
    for b, n in enumerate(np.asarray(lengths)):
        mask[b, :, 0, :n] = True
    ref = attention_f64(q[:, None], k, v, mask, scale)[:, 0]  # [batch, heads, head_dim]
    assert_matches_reference(out[:, None], ref[:, None], mask, dtype)
    xla = decode_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths, scale=scale
    )
    np.testing.assert_allclose(np.asarray(xla), ref, atol=1e-4, rtol=1e-4)


def test_decode_attention_names_bad_input():
    q = jnp.zeros((1, 6, 64))
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        decode_attention(
            q,
            jnp.zeros((1, 8, 4, 64)),
            jnp.zeros((1, 8, 4, 64)),
            jnp.ones((1,), jnp.int32),
            scale=1.0,
            interpret=INTERPRET,
        )


def test_decode_attention_reads_one_layer_of_a_stacked_cache():
    """With `layer`, the kernel takes the whole [layers, ...] cache and must read exactly that layer (traced
    index), for shapes that need no padding and for ones that do (capacity off the block, head_dim 96)."""
    rng = np.random.default_rng(110)
    for capacity, head_dim in ((128, 64), (100, 96)):
        layers, batch, heads, kv_heads = 3, 2, 4, 2
        q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.float32)
        k, v = (
            jnp.asarray(rng.standard_normal((layers, batch, capacity, kv_heads, head_dim)), jnp.float32)
            for _ in range(2)
        )
        lengths = jnp.asarray([capacity, capacity // 3], jnp.int32)
        for layer in range(layers):
            out = decode_attention(
                q, k, v, lengths, scale=0.125, layer=jnp.int32(layer), block_k=32, interpret=INTERPRET
            )
            ref = decode_attention_reference(q, k[layer], v[layer], lengths, scale=0.125)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_decode_attention_skips_slots_before_first():
    """A compressed layer's valid slots are [first, length): the kernel must ignore the slots before first."""
    rng = np.random.default_rng(111)
    batch, capacity, heads, kv_heads, d = 3, 96, 4, 2, 64
    q = jnp.asarray(rng.standard_normal((batch, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, d)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([96, 50, 7], jnp.int32)
    first = jnp.asarray([10, 49, 0], jnp.int32)
    out = decode_attention(q, k, v, lengths, scale=0.125, first=first, block_k=16, interpret=INTERPRET)
    mask = np.zeros((batch, heads, 1, capacity), bool)
    for b in range(batch):
        mask[b, :, 0, int(first[b]) : int(lengths[b])] = True
    ref = attention_f64(q[:, None], k, v, mask, 0.125)[:, 0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(
        np.asarray(decode_attention_reference(q, k, v, lengths, scale=0.125, first=first)), ref, atol=2e-5, rtol=2e-5
    )


def test_gemv_kernel_equals_float64_product():
    """The Pallas GEMV `benchmarks.gemv` times against XLA (interpret mode here) equals numpy in float64, batch 1
    and 3, and names a block size that does not divide the weights."""
    from lcjax.pallas.gemv import gemv, gemv_reference

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(96, 128)), jnp.bfloat16)
    for m in (1, 3):
        x = jnp.asarray(rng.normal(size=(m, 128)), jnp.bfloat16)
        got = gemv(x, w, block_out=32, block_in=64, interpret=True)
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        assert got.shape == (m, 96) and got.dtype == jnp.bfloat16
        for out in (got, gemv_reference(x, w)):
            np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="block_out"):
        gemv(x, w, block_out=40, block_in=64, interpret=True)
