"""Independent float64 numpy references shared by the attention and kernel tests."""

import jax.numpy as jnp
import numpy as np

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


def cover_mask(verticals, slashes, q_len, block):
    """numpy, MInference's range semantics: slash offsets merged into groups (consecutive offsets at most
    `block` apart); query i of block r0 attends key j <= i iff j is vertical or r0 - D1 <= j <= r0 + block - 1
    - D0 for a group [D0, D1]."""
    verticals, slashes = np.asarray(verticals), np.asarray(slashes)
    batch, heads = verticals.shape[:2]
    mask = np.zeros((batch, heads, q_len, q_len), bool)
    rows = np.arange(q_len)
    for b in range(batch):
        for h in range(heads):
            groups = []
            for d in sorted({int(d) for d in slashes[b, h] if 0 <= d < q_len}):
                if groups and d - groups[-1][1] <= block:
                    groups[-1][1] = d
                else:
                    groups.append([d, d])
            for i in rows:
                r0 = i // block * block
                for d0, d1 in groups:
                    lo, hi = max(0, r0 - d1), min(i, r0 + block - 1 - d0)
                    if lo <= hi:  # (a negative slice end would wrap around)
                        mask[b, h, i, lo:hi + 1] = True
                for j in verticals[b, h]:
                    if 0 <= j <= i:
                        mask[b, h, i, j] = True
    return mask


def run_on_poisoned_output(fn, *args):
    """fn(*args) (jitted, one output), with its output landing in memory that held NaNs just before: the test
    compiles first, fills a buffer of the output's shape with NaN, frees it, and checks that the output got
    the same address (the allocator's reuse), so every element the kernel fails to write stays NaN."""
    import jax

    compiled = fn.lower(*args).compile()  # compile first: its allocations must not take the poison
    jax.block_until_ready(args)
    shape = compiled.out_info
    poison = jnp.full(shape.shape, jnp.nan, shape.dtype).block_until_ready()
    address = poison.unsafe_buffer_pointer()
    poison.delete()
    out = fn(*args)
    assert out.unsafe_buffer_pointer() == address, "the allocator did not reuse the poisoned buffer"
    return out
