"""Independent float64 numpy references shared by the attention and kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np

# the Triton-lowered kernels run compiled on a GPU (`JAX_PLATFORMS=cuda pytest tests/test_pallas_*.py` on the
# device), in Pallas' interpreter elsewhere
INTERPRET = jax.default_backend() != "gpu"

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3}  # relative L2 error by input dtype


def attention_f64(q, k, v, mask, scale):
    """Masked softmax attention in float64. q `[b, q, h, d]`, k/v `[b, kv, kvh, d]` (GQA: head h reads kv head
    h // (h / kvh)); mask bool `[b, h, q, kv]`. Rows with no allowed key are zeros."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    batch, q_len, heads, _ = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            s = np.where(mask[b, h], q[b, :, h] @ k[b, :, h // groups].T * scale, -np.inf)
            row_max = s.max(axis=1, keepdims=True)
            p = np.where(mask[b, h], np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
            denom = p.sum(axis=1, keepdims=True)
            out[b, :, h] = (p / np.where(denom == 0, 1.0, denom)) @ v[b, :, h // groups]
    return out


def assert_matches_reference(out, ref, mask, dtype):
    """Every element finite, rows with no allowed key exactly zero, relative L2 error and the largest element
    error within the dtype's tolerance. out/ref `[b, q, h, d]`, mask `[b, h, q, kv]`."""
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    assert np.isfinite(out).all()
    empty = ~mask.any(-1).transpose(0, 2, 1)  # [batch, q_len, heads]
    assert (out[empty] == 0).all()
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], err
    assert np.abs(out - ref).max() < 30 * TOL[dtype] * np.abs(ref).max()
    return empty


def minference_ranges(slashes_desc, end_m, block, clamp=False):
    """The key ranges [start, end) MInference's `convert_vertical_slash_indexes` (csrc/vertical_slash_index.cu)
    builds for the query block ending at row end_m, from slash offsets in descending order, transcribed loop
    for loop. clamp=True is MInference exactly (offsets >= end_m skipped, a window that starts before key 0
    moved to [0, block)); clamp=False keeps every window where it is (lcjax's definition; negative keys are
    dropped by the caller)."""
    ranges = []
    for d in slashes_desc:
        if clamp and d >= end_m:
            continue
        s_idx = max(end_m - d, block) if clamp else end_m - d  # the window's end
        if not ranges:
            ranges.append([s_idx - block, s_idx])
        elif s_idx > ranges[-1][1] + block:
            ranges.append([s_idx - block, s_idx])
        elif s_idx > ranges[-1][1]:
            ranges[-1][1] += block
    return ranges


def cover_mask(verticals, slashes, q_len, block, clamp=False):
    """numpy, MInference's kernel semantics: query i of block r0 attends key j <= i iff j is vertical or j lies
    in a range of `minference_ranges` for the block (every key of it, causally)."""
    verticals, slashes = np.asarray(verticals), np.asarray(slashes)
    batch, heads = verticals.shape[:2]
    mask = np.zeros((batch, heads, q_len, q_len), bool)
    for b in range(batch):
        for h in range(heads):
            desc = sorted({int(d) for d in slashes[b, h] if 0 <= d < q_len}, reverse=True)
            for r0 in range(0, q_len, block):
                for start, end in minference_ranges(desc, r0 + block, block, clamp):
                    for i in range(r0, min(r0 + block, q_len)):
                        lo, hi = max(start, 0), min(end, i + 1)
                        if lo < hi:
                            mask[b, h, i, lo:hi] = True
            for j in verticals[b, h]:
                if 0 <= j < q_len:
                    mask[b, h, j:, j] = True
    return mask


def run_on_poisoned_output(fn, *args, copies: int = 8, attempts: int = 16):
    """fn(*args) (jitted, one output), with its output landing in memory that held NaNs just before: the test
    compiles first, fills `copies` buffers of the output's size with NaN, frees them, runs, and checks that the
    output's bytes lie inside the poisoned ranges, so every element the kernel fails to write stays NaN.
    A small live buffer after each poisoned one keeps the freed ones from merging into one large hole, which
    the allocator would pass over for a closer-fitting hole left by earlier tests; an attempt that lands in
    such a hole keeps its output alive, filling it, and the next attempt poisons afresh."""
    compiled = fn.lower(*args).compile()  # compile first: its allocations must not take the poison
    jax.block_until_ready(args)
    shape = compiled.out_info
    kept = []  # spacers and missed outputs stay alive until the end
    for _ in range(attempts):
        poisons = []
        for _ in range(copies):
            poisons.append(jnp.full(shape.shape, jnp.nan, shape.dtype).block_until_ready())
            kept.append(jnp.zeros((64,), jnp.float32).block_until_ready())
        nbytes = poisons[0].nbytes
        ranges = sorted((p.unsafe_buffer_pointer(), p.unsafe_buffer_pointer() + nbytes) for p in poisons)
        for p in poisons:
            p.delete()
        out = fn(*args)
        start = out.unsafe_buffer_pointer()
        covered = start  # walk the sorted ranges from the output's first byte
        for lo, hi in ranges:
            if lo <= covered < hi:
                covered = hi
        if covered >= start + nbytes:
            return out
        kept.append(out)
    raise AssertionError(f"the allocator did not place the output in poisoned memory in {attempts} attempts")
