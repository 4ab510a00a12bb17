"""block_sparse_attention (Pallas: interpret mode on CPU, compiled on a GPU) against a float64 numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import INTERPRET, TOL, assert_matches_reference, attention_f64

from lcjax.pallas.block_sparse_attention import (
    _pallas_forward,
    block_sparse_attention_reference,
    canonicalize_block_indices,
)
from lcjax.pallas.dispatch import block_sparse_attention


def blocks_to_mask(idx, counts, q_len, kv_len, block_q, block_k, causal):
    idx, counts = np.asarray(idx), np.asarray(counts)
    batch, heads, nqb, _ = idx.shape
    nkb = -(-kv_len // block_k)
    mask = np.zeros((batch, heads, q_len, kv_len), bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(nqb):
                for j in idx[b, h, i, : counts[b, h, i]]:
                    if 0 <= j < nkb:
                        mask[b, h, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k] = True
    if causal:
        mask &= np.tril(np.ones((q_len, kv_len), bool))
    return mask


def random_inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, jnp.float32).astype(dtype)

    return (
        draw(batch, q_len, heads, head_dim),
        draw(batch, kv_len, kv_heads, head_dim),
        draw(batch, kv_len, kv_heads, head_dim),
    )


def random_lists(rng, batch, heads, nqb, nkb, max_blocks):
    """Ids from -2 to nkb + 1 (out of range included), duplicates likely, counts 0..max_blocks; the first
    query block of every head is empty and the second lists every key block."""
    idx = rng.integers(-2, nkb + 2, (batch, heads, nqb, max_blocks))
    counts = rng.integers(0, max_blocks + 1, (batch, heads, nqb))
    counts[:, :, 0] = 0
    if nqb > 1 and max_blocks >= nkb:
        idx[:, :, 1, :nkb] = np.arange(nkb)
        counts[:, :, 1] = max_blocks
    return jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32)


CASES = [  # batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_k, causal
    (1, 100, 100, 4, 4, 64, jnp.float32, 16, 16, True),
    (2, 200, 200, 8, 2, 128, jnp.bfloat16, 32, 16, True),
    (1, 150, 150, 8, 1, 64, jnp.bfloat16, 16, 32, True),
    (1, 120, 136, 4, 1, 96, jnp.float32, 32, 32, False),
    (1, 96, 96, 4, 2, 64, jnp.float16, 32, 32, True),
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,block_q,block_k,causal", CASES)
def test_block_sparse_matches_float64_reference(
    batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_k, causal
):
    rng = np.random.default_rng(hash((q_len, heads, head_dim)) % 2**32)
    q, k, v = random_inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    nqb, nkb = -(-q_len // block_q), -(-kv_len // block_k)
    idx, counts = random_lists(rng, batch, heads, nqb, nkb, max_blocks=nkb + 3)
    scale = head_dim**-0.5
    out = block_sparse_attention(
        q, k, v, idx, counts, scale=scale, causal=causal, block_q=block_q, block_k=block_k, interpret=INTERPRET
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = blocks_to_mask(idx, counts, q_len, kv_len, block_q, block_k, causal)
    ref = attention_f64(q, k, v, mask, scale)
    empty = assert_matches_reference(out, ref, mask, dtype)
    assert empty.any() and (~empty).any()


@pytest.mark.parametrize("heads_fastest", [True, False])
def test_block_sparse_all_blocks_is_dense_causal_attention(heads_fastest):
    rng = np.random.default_rng(1)
    q, k, v = random_inputs(rng, 1, 130, 130, 8, 4, 64, jnp.float32)
    nqb = nkb = 5
    idx = jnp.broadcast_to(jnp.arange(nkb, dtype=jnp.int32), (1, 8, nqb, nkb))
    counts = jnp.full((1, 8, nqb), nkb, jnp.int32)
    out = block_sparse_attention(
        q, k, v, idx, counts, scale=0.1, block_q=32, block_k=32, interpret=INTERPRET, heads_fastest=heads_fastest
    )
    mask = np.broadcast_to(np.tril(np.ones((130, 130), bool)), (1, 8, 130, 130))
    np.testing.assert_allclose(np.asarray(out), attention_f64(q, k, v, mask, 0.1), rtol=1e-4, atol=1e-5)


def test_block_sparse_kernel_writes_every_output_element():
    rng = np.random.default_rng(2)
    q, k, v = random_inputs(rng, 1, 96, 96, 4, 2, 64, jnp.bfloat16)
    idx, counts = random_lists(rng, 1, 4, 3, 3, max_blocks=4)
    indices, schedule = canonicalize_block_indices(
        idx, counts, q_len=96, kv_len=96, block_q=32, block_k=32, causal=True
    )
    poison = jnp.full(q.shape, jnp.nan, q.dtype)
    out = _pallas_forward(
        q,
        k,
        v,
        indices,
        schedule,
        kv_len=96,
        scale=0.125,
        causal=True,
        block_q=32,
        block_k=32,
        interpret=INTERPRET,
        num_warps=None,
        num_stages=None,
        out_init=poison,
    )
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    ref = attention_f64(q, k, v, blocks_to_mask(idx, counts, 96, 96, 32, 32, True), 0.125)
    assert np.linalg.norm(np.asarray(out.astype(jnp.float32)) - ref) / np.linalg.norm(ref) < TOL[jnp.bfloat16]


def test_canonicalize_counts_each_block_once_and_puts_unmasked_tiles_first():
    rng = np.random.default_rng(3)
    q_len, block = 150, 32
    nqb = nkb = 5
    idx, counts = random_lists(rng, 2, 3, nqb, nkb, max_blocks=9)
    indices, schedule = canonicalize_block_indices(
        idx, counts, q_len=q_len, kv_len=q_len, block_q=block, block_k=block, causal=True
    )
    indices, schedule, idx, counts = map(np.asarray, (indices, schedule, idx, counts))
    for b in range(2):
        for h in range(3):
            for i in range(nqb):
                want = {j for j in idx[b, h, i, : counts[b, h, i]] if 0 <= j <= i}
                n_plain, n_all = schedule[b, h, i]
                got = indices[b, h, i, :n_all]
                assert sorted(got) == sorted(want) and len(got) == len(want)
                assert all(j < i for j in got[:n_plain]) and all(j == i for j in got[n_plain:])
                # the last key block holds padded keys (150 % 32 != 0), so it is never unmasked
                assert nkb - 1 not in got[:n_plain]


def test_block_sparse_xla_reference_matches_float64():
    rng = np.random.default_rng(4)
    q, k, v = random_inputs(rng, 1, 100, 100, 4, 2, 64, jnp.float32)
    idx, counts = random_lists(rng, 1, 4, 7, 7, max_blocks=8)
    out = block_sparse_attention_reference(q, k, v, idx, counts, scale=0.125, block_q=16, block_k=16)
    ref = attention_f64(q, k, v, blocks_to_mask(idx, counts, 100, 100, 16, 16, True), 0.125)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_block_sparse_names_unsupported_head_dim_and_dtype():
    q = jnp.ones((1, 32, 2, 80), jnp.bfloat16)
    lists = jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="head_dim=80 is not supported by block_sparse_attention"):
        block_sparse_attention(q, q[:, :, :1], q[:, :, :1], *lists, scale=1.0, block_q=16, block_k=16)
    q = jnp.ones((1, 32, 2, 64), jnp.int8)
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        block_sparse_attention(q, q, q, *lists, scale=1.0, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(
            q.astype(jnp.float32),
            q.astype(jnp.float32),
            q.astype(jnp.float32),
            *lists,
            scale=1.0,
            block_q=24,
            block_k=16,
        )


def test_block_sparse_past_the_int32_offset_limit_runs_in_kv_head_groups(monkeypatch):
    """Calls whose q would reach 2^31 elements split by KV-head groups (forced with a small limit here)."""
    from lcjax.pallas import _common
    from lcjax.pallas import block_sparse_attention as bsa

    rng = np.random.default_rng(108)
    batch, q_len, heads, kv_heads, block = 1, 88, 6, 3, 16
    q, k, v = random_inputs(rng, batch, q_len, q_len, heads, kv_heads, 64, jnp.float32)
    idx, counts = random_lists(rng, batch, heads, 6, 6, 4)
    monkeypatch.setattr(_common, "MAX_KERNEL_ELEMENTS", 96 * 2 * 64 + 1)  # one KV group (2 q heads) per call
    calls = []
    real = bsa._pallas_forward
    monkeypatch.setattr(bsa, "_pallas_forward", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    out = block_sparse_attention(q, k, v, idx, counts, scale=0.125, block_q=block, block_k=block, interpret=INTERPRET)
    assert calls == [(1, 96, 2, 64)] * kv_heads
    mask = blocks_to_mask(idx, counts, q_len, q_len, block, block, True)
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.125), mask, jnp.float32)


def test_hopper_kernel_names_unsupported_configs():
    """The Mosaic GPU kernel's wrapper checks its inputs before any GPU work (so this runs on the CPU)."""
    from lcjax.pallas import dispatch
    from lcjax.pallas.block_sparse_attention_mgpu import block_sparse_attention_mgpu

    q = jnp.zeros((1, 128, 4, 128), jnp.float32)
    lists = (jnp.zeros((1, 4, 1, 1), jnp.int32), jnp.zeros((1, 4, 1, 2), jnp.int32))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        block_sparse_attention_mgpu(q, q, q, *lists, scale=1.0)
    q16 = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k=32"):
        block_sparse_attention_mgpu(q16, q16, q16, *lists, scale=1.0, block_k=32)
    with pytest.raises(ValueError, match="shared memory"):
        block_sparse_attention_mgpu(q16, q16, q16, *lists, scale=1.0, block_k=128, stages=4)
    with pytest.raises(ValueError, match="implementation='cuda'"):
        dispatch.block_sparse_attention(
            q, q, q, *lists[:1], jnp.zeros((1, 4, 1), jnp.int32), scale=1.0, implementation="cuda"
        )


@pytest.mark.parametrize("items,num_ctas", [(64, 3), (64, 64), (2048, 132), (8192, 132), (7, 5), (1, 1)])
def test_hopper_kernel_turns_cover_every_item_once(items, num_ctas):
    """The persistent Hopper kernel's CTAs take items in snake order: every item exactly once, each CTA the
    count `snake_turns` says, and on items whose lists shrink by one tile each (longest first, as the kernel
    orders them) no CTA has more than one round's spread (num_ctas tiles) above the average work; taking them
    round-robin would put CTA 0 about num_ctas / 2 tiles ahead every round (1033 tiles at 2048 items)."""
    from lcjax.pallas.block_sparse_attention_mgpu import snake_turn, snake_turns

    ctas = np.arange(num_ctas)
    counts = np.asarray(snake_turns(ctas, num_ctas, items))
    taken = [np.asarray(snake_turn(np.arange(counts[c]), c, num_ctas)) for c in ctas]
    np.testing.assert_array_equal(np.sort(np.concatenate(taken)), np.arange(items))
    assert counts.max() - counts.min() <= 1
    work = np.arange(items, 0, -1, dtype=np.float64)  # item t's list: items - t tiles
    per_cta = np.array([work[t].sum() for t in taken])
    assert per_cta.max() - work.sum() / num_ctas <= num_ctas


@pytest.mark.parametrize(
    "kv_heads,bytes_per_head,want",
    [
        (8, 2 << 20, 8),
        (8, 4 << 20, 8),
        (8, 8 << 20, 2),
        (8, 16 << 20, 1),
        (6, 8 << 20, 2),
        (6, 4 << 20, 6),
        (1, 1 << 30, 1),
    ],
)
def test_hopper_kernel_runs_group_kv_heads_that_fit_l2(kv_heads, bytes_per_head, want):
    from lcjax.pallas.block_sparse_attention_mgpu import kv_heads_per_run

    assert kv_heads_per_run(kv_heads, bytes_per_head) == want
