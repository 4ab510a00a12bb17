"""The Hopper (Mosaic GPU) block-sparse kernel against the float64 numpy reference. GPU only: Mosaic GPU's
interpreter cannot run wgmma, so these run on the device (`pytest tests/test_block_sparse_attention_mgpu.py`) and
skip on the CPU; the CPU suite covers the same contract through the Triton kernel in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TOL, assert_matches_reference, attention_f64, run_on_poisoned_output
from test_pallas_block_sparse import blocks_to_mask, random_inputs, random_lists

from lcjax.pallas.block_sparse_attention import canonicalize_block_indices
from lcjax.pallas.block_sparse_attention_mgpu import block_sparse_attention_mgpu
from lcjax.pallas.dispatch import block_sparse_attention

ON_HOPPER = jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"
pytestmark = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU wgmma kernel: needs an sm_90 GPU")

CASES = [  # batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_k, causal, stages
    (1, 1000, 1000, 8, 2, 128, jnp.bfloat16, 128, 128, True, 2),  # ragged tail, GQA 4
    (2, 512, 512, 8, 1, 64, jnp.float16, 64, 64, True, 2),  # GQA 8, head_dim 64, one warpgroup
    (1, 384, 384, 4, 4, 96, jnp.bfloat16, 128, 64, True, 3),  # GQA 1, head_dim 96 (padded), 3 slots
    (1, 256, 328, 4, 2, 128, jnp.bfloat16, 128, 128, False, 2),  # not causal, kv_len != q_len, ragged keys
    (1, 640, 640, 4, 1, 128, jnp.float16, 64, 128, True, 3),  # one warpgroup, 128-key tiles
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,dtype,block_q,block_k,causal,stages", CASES)
def test_hopper_block_sparse_matches_float64_reference(
    batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_k, causal, stages
):
    rng = np.random.default_rng(hash((q_len, heads, head_dim, block_q)) % 2**32)
    q, k, v = random_inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    nqb, nkb = -(-q_len // block_q), -(-kv_len // block_k)
    idx, counts = random_lists(rng, batch, heads, nqb, nkb, max_blocks=nkb + 3)  # empty lists, duplicates
    scale = head_dim**-0.5
    out = block_sparse_attention(
        q,
        k,
        v,
        idx,
        counts,
        scale=scale,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        num_stages=stages,
        implementation="mosaic",
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = blocks_to_mask(idx, counts, q_len, kv_len, block_q, block_k, causal)
    empty = assert_matches_reference(out, attention_f64(q, k, v, mask, scale), mask, dtype)
    assert empty.any() and (~empty).any()


def test_hopper_block_sparse_all_blocks_is_dense_causal_attention():
    rng = np.random.default_rng(3)
    q, k, v = random_inputs(rng, 1, 1024, 1024, 8, 2, 128, jnp.bfloat16)
    idx = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 8, 8, 8))
    out = block_sparse_attention(
        q, k, v, idx, jnp.full((1, 8, 8), 8, jnp.int32), scale=0.08, block_q=128, block_k=128, implementation="mosaic"
    )
    mask = np.broadcast_to(np.tril(np.ones((1024, 1024), bool)), (1, 8, 1024, 1024))
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.08), mask, jnp.bfloat16)


@pytest.mark.parametrize("num_ctas", [32, 11])
def test_hopper_block_sparse_writes_every_output_element(num_ctas):
    """The output lands in memory filled with NaN just before (the allocator hands freed poison buffers to the
    kernel's output: checked by address); every element must be overwritten, with one CTA per (head, query
    block) item (32 of them) or CTAs that take 3 or 2 items in turn."""
    rng = np.random.default_rng(4)
    q, k, v = random_inputs(rng, 1, 512, 512, 8, 2, 128, jnp.bfloat16)
    idx, counts = random_lists(rng, 1, 8, 4, 4, max_blocks=6)
    indices, schedule = canonicalize_block_indices(
        idx, counts, q_len=512, kv_len=512, block_q=128, block_k=128, causal=True
    )
    out = run_on_poisoned_output(
        jax.jit(lambda *a: block_sparse_attention_mgpu(*a, scale=0.1, num_ctas=num_ctas)), q, k, v, indices, schedule
    )
    mask = blocks_to_mask(idx, counts, 512, 512, 128, 128, True)
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.1), mask, jnp.bfloat16)


def test_hopper_block_sparse_equals_triton_kernel():
    """Two independent kernels, one contract: same lists, outputs within bf16 rounding of each other."""
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 1, 2048, 2048, 8, 2, 128, jnp.bfloat16)
    idx, counts = random_lists(rng, 1, 8, 16, 16, max_blocks=10)
    kw = dict(scale=0.088, block_q=128, block_k=128)
    a = block_sparse_attention(q, k, v, idx, counts, implementation="mosaic", **kw).astype(jnp.float32)
    b = block_sparse_attention(q, k, v, idx, counts, implementation="triton", **kw).astype(jnp.float32)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize(
    "num_ctas,stages,block_q,block_k",
    [(32, 2, 128, 128), (22, 3, 128, 128), (13, 2, 64, 64), (16, 2, 128, 64), (3, 2, 128, 128)],
)
def test_hopper_block_sparse_query_blocks_in_turn(num_ctas, stages, block_q, block_k):
    """CTAs that take several of the 64 (head, query block) items in turn (2, 3 or 2, 5 or 4, 4, 22 or 21
    each), with one Q tile (3 slots of 128 x 128 leave no room for a second) or two, and empty lists and
    duplicates, give the float64 reference's result."""
    rng = np.random.default_rng(101)
    q_len = 8 * block_q - 37
    q, k, v = random_inputs(rng, 1, q_len, q_len, 8, 2, 128, jnp.bfloat16)
    nqb, nkb = -(-q_len // block_q), -(-q_len // block_k)
    idx, counts = random_lists(rng, 1, 8, nqb, nkb, max_blocks=nkb + 3)
    indices, schedule = canonicalize_block_indices(
        idx, counts, q_len=q_len, kv_len=q_len, block_q=block_q, block_k=block_k, causal=True
    )
    out = block_sparse_attention_mgpu(
        q, k, v, indices, schedule, scale=0.1, block_q=block_q, block_k=block_k, stages=stages, num_ctas=num_ctas
    )
    mask = blocks_to_mask(idx, counts, q_len, q_len, block_q, block_k, True)
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.1), mask, jnp.bfloat16)
