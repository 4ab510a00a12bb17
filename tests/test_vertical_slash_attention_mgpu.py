"""The Hopper (Mosaic GPU) vertical-slash kernel, cover semantics. The schedule replay runs on the CPU (it checks
the builder: every pair of the cover mask counted exactly once); the kernel tests need an sm_90 GPU (Mosaic
GPU's interpreter cannot run wgmma) and skip elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import assert_matches_reference, attention_f64, cover_mask, run_on_poisoned_output
from test_pallas_vertical_slash import nearest_diagonals, random_inputs, random_pattern, run_pattern

from lcjax.pallas import vertical_slash_attention_mgpu as vsh
from lcjax.pallas import vertical_slash_ranges as vsr

ON_HOPPER = jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU wgmma kernel: needs an sm_90 GPU")
B = vsh.BLOCK


def bits(words, position):
    return (int(np.uint32(np.int32(words[position // 32]))) >> (position % 32)) & 1


def hopper_visit_counts(index, columns, q_len):
    """How many times the Hopper schedule counts each (query, key) pair: the kernel's loops replayed in numpy.
    A CTA walks the chunks of its two query blocks once (each group's 64-key chunks from the first live block's
    lo through the second block's hi, with the load clamp; then the column chunks; then each
    block's diagonal tile); each block counts the chunks that meet its range, masked unless wholly inside it and
    at or before its first row, its columns by bit, and its own diagonal tile."""
    ix = {n: np.asarray(getattr(index, n)) for n in ("group_start", "group_end", "group_counts")}
    col = {n: np.asarray(getattr(columns, n)) for n in ("columns", "before_words", "column_chunks", "diagonal_words")}
    batch, heads, nqb = col["column_chunks"].shape
    padded = nqb * B
    counts = np.pad(ix["group_counts"], [(0, 0), (0, 0), (0, nqb - ix["group_counts"].shape[-1])])
    seen = np.zeros((batch, heads, padded, padded), np.int32)
    lane = np.arange(B)
    for b, h, pair in np.ndindex(batch, heads, nqb // 2):
        blocks = (2 * pair, 2 * pair + 1)
        for n in range(max(counts[b, h, blocks[0]], counts[b, h, blocks[1]])):  # a padding block has none
            start_n, end_n = ix["group_start"][b, h, n], ix["group_end"][b, h, n]
            lead = blocks[0] if n < counts[b, h, blocks[0]] else blocks[1]
            first = max(lead * B - end_n, 0)
            last = blocks[1] * B + B - 1 - start_n
            for start in range(first, last + 1, B):
                keys = min(start, padded - B) + lane
                for qb in blocks:
                    r0 = qb * B
                    lo, hi = max(r0 - end_n, 0), r0 + B - 1 - start_n
                    if n >= counts[b, h, qb] or start + B - 1 < lo or start > hi:
                        continue
                    if start >= lo and start + B - 1 <= min(hi, r0):
                        seen[b, h, r0 : r0 + B, start : start + B] += 1
                        continue
                    rows = r0 + lane
                    m = (keys >= max(start, lo)) & (keys <= hi) & (keys[None, :] <= rows[:, None])
                    seen[b, h, r0 : r0 + B, keys[0] : keys[0] + B] += m
        for qb in blocks:
            r0 = qb * B
            for c in range(col["column_chunks"][b, h, qb]):
                for p in range(c * B, (c + 1) * B):
                    if bits(col["before_words"][b, h, qb], p):
                        seen[b, h, r0 : r0 + B, col["columns"][b, h, p]] += 1
            for t in range(B):
                if bits(col["diagonal_words"][b, h, qb], t):
                    seen[b, h, r0 : r0 + B, r0 + t] += r0 + lane >= r0 + t
    return seen[:, :, :q_len, :q_len]


PATTERNS = ["runs", "random", "nearest", "no_verticals", "no_slashes", "dense_columns"]


def make_pattern(rng, pattern, heads, q_len):
    if pattern == "runs":
        return run_pattern(rng, 1, heads, q_len, n_runs=5, widths=(10, 90))
    if pattern == "random":
        return random_pattern(rng, 1, heads, q_len, 40, 60)
    if pattern == "nearest":
        return nearest_diagonals(1, heads, 70, 150)
    if pattern == "no_verticals":
        slashes = run_pattern(rng, 1, heads, q_len, n_runs=3, n_nearest=0)[1]
        return jnp.zeros((1, heads, 0), jnp.int32), jnp.where(slashes < 5, -1, slashes)
    if pattern == "no_slashes":
        return random_pattern(rng, 1, heads, q_len, 50, 0)
    # every column vertical near the diagonal and a few slashes: diagonal pass and ranges overlap
    v = jnp.broadcast_to(jnp.arange(q_len - 150, q_len, dtype=jnp.int32), (1, heads, 150))
    return v, jnp.broadcast_to(jnp.asarray([0, 3, 200], jnp.int32), (1, heads, 3))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hopper_schedule_counts_every_cover_pair_exactly_once(pattern):
    rng = np.random.default_rng(120)
    q_len, heads = 400, 2  # 7 query blocks: the last CTA pairs one with a padding block
    verticals, slashes = make_pattern(rng, pattern, heads, q_len)
    index, columns = vsh.build_mgpu_index(verticals, slashes, q_len)
    full = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, B, semantics="cover")  # the same, with lists
    for name in ("group_start", "group_end", "group_counts", "is_vertical", "slash_next", "slash_prev"):
        np.testing.assert_array_equal(getattr(index, name), getattr(full, name))
    assert index.column_indices.shape[-1] == 0
    assert columns.column_chunks.shape[-1] % 2 == 0  # two query blocks per CTA
    seen = hopper_visit_counts(index, columns, q_len)
    np.testing.assert_array_equal(seen, cover_mask(verticals, slashes, q_len, B).astype(np.int32))


CASES = [  # q_len, heads, kv_heads, head_dim, dtype, pattern, stages
    (1000, 8, 2, 128, jnp.bfloat16, "runs", 4),
    (777, 4, 4, 64, jnp.float16, "random", 3),
    (640, 8, 1, 96, jnp.bfloat16, "nearest", 6),
    (512, 4, 2, 128, jnp.bfloat16, "no_verticals", 2),
    (300, 4, 2, 128, jnp.float16, "no_slashes", 2),
    (400, 4, 2, 128, jnp.bfloat16, "dense_columns", 3),
]


@needs_hopper
@pytest.mark.parametrize("q_len,heads,kv_heads,head_dim,dtype,pattern,stages", CASES)
def test_hopper_vertical_slash_matches_float64_cover_reference(
    q_len, heads, kv_heads, head_dim, dtype, pattern, stages
):
    rng = np.random.default_rng(121)
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype)
    verticals, slashes = make_pattern(rng, pattern, heads, q_len)
    index, columns = vsh.build_mgpu_index(verticals, slashes, q_len)
    scale = head_dim**-0.5
    out = vsh.vertical_slash_attention_mgpu(q, k, v, index, columns, scale=scale, stages=stages)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = cover_mask(verticals, slashes, q_len, B)
    assert_matches_reference(out, attention_f64(q, k, v, mask, scale), mask, dtype)


@needs_hopper
def test_hopper_vertical_slash_writes_every_output_element():
    """The output lands in a freed NaN-filled buffer (same address, checked); every element is overwritten."""
    rng = np.random.default_rng(7)
    q, k, v = random_inputs(rng, 512, 8, 2, 128, jnp.bfloat16)
    verticals, slashes = make_pattern(rng, "runs", 8, 512)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, 512, B, semantics="cover")
    columns = vsh.build_mgpu_columns(verticals, index, 512)
    out = run_on_poisoned_output(
        jax.jit(lambda *a: vsh.vertical_slash_attention_mgpu(*a, scale=0.1)), q, k, v, index, columns
    )
    mask = cover_mask(verticals, slashes, 512, B)
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.1), mask, jnp.bfloat16)


def test_hopper_vertical_slash_names_unsupported_inputs():
    q = jnp.zeros((1, 128, 4, 128), jnp.float32)
    zeros = jnp.zeros((1, 4, 1), jnp.int32)
    index = vsr.build_vertical_slash_ranges(zeros, zeros, 128, B, semantics="cover")
    columns = vsh.build_mgpu_columns(zeros, index, 128)
    exact = vsr.build_vertical_slash_ranges(zeros, zeros, 128, B)
    with pytest.raises(ValueError, match="cover semantics"):
        vsh.build_mgpu_columns(zeros, exact, 128)
    with pytest.raises(ValueError, match="cover semantics"):
        vsh.vertical_slash_attention_mgpu(
            q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), exact, columns, scale=1.0
        )
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        vsh.vertical_slash_attention_mgpu(q, q, q, index, columns, scale=1.0)
    q16 = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        vsh.vertical_slash_attention_mgpu(q16, q16, q16, index, columns, scale=1.0, stages=7)
    without_lists = vsh.build_mgpu_index(jnp.zeros((1, 4, 1), jnp.int32), jnp.zeros((1, 4, 1), jnp.int32), 128)[0]
    with pytest.raises(ValueError, match="columns=True"):
        vsr.vertical_slash_attention_ranges(q16, q16, q16, without_lists, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="64-row blocks"):
        vsh.build_mgpu_columns(
            jnp.zeros((1, 4, 1), jnp.int32),
            vsr.build_vertical_slash_ranges(jnp.zeros((1, 4, 1), jnp.int32), jnp.zeros((1, 4, 1), jnp.int32), 128, 32),
            128,
        )


@needs_hopper
def test_sparse_prefill_runs_cover_patterns_through_the_hopper_kernel():
    """`pallas_pattern_attention` (what MInference(..., slash_semantics="cover") runs) picks this kernel on Hopper
    with bf16 inputs and gives the cover reference's result, Tri-shape's dense tail included."""
    from lcjax.methods.sparse_pattern import SparsePattern
    from lcjax.methods.sparse_prefill import pallas_pattern_attention

    rng = np.random.default_rng(122)
    q_len, heads = 700, 8
    q, k, v = random_inputs(rng, q_len, heads, 2, 128, jnp.bfloat16)
    verticals, slashes = make_pattern(rng, "runs", heads, q_len)
    pattern = SparsePattern(vertical=verticals, slash=slashes, block_size=B, dense_last=5, slash_semantics="cover")
    out = pallas_pattern_attention(q, k, v, pattern, jnp.asarray([q_len]), 0.09)
    mask = cover_mask(verticals, slashes, q_len, B)
    mask[:, :, -5:] = np.tril(np.ones((q_len, q_len), bool))[-5:]
    assert_matches_reference(out, attention_f64(q, k, v, mask, 0.09), mask, jnp.bfloat16)
