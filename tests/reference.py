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
