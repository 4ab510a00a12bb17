"""Numerics every layer shares: dot precision, attention masks, one masked softmax and the XLA attention
reference that every kernel is checked against. Imports only jax.

Softmax statistics are fp32 whatever the input dtype; a row whose every entry is masked gives zeros, never NaN
(a fully masked row happens for padding rows and for empty cache pages).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MaskFn = Callable[[jax.Array], jax.Array]


def float32_precision(*arrays: jax.Array) -> jax.lax.Precision | None:
    """The dot precision for these operands: HIGHEST where any is float32, else None (the backend's default).

    On the GPU, XLA's and Triton's default for float32 dots is TF32 (~5e-4 relative error); bf16/fp16 operands
    are unaffected."""
    return jax.lax.Precision.HIGHEST if any(x.dtype == jnp.float32 for x in arrays) else None


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of `logits` restricted to `mask` (broadcastable to it); rows with no allowed
    entry are zeros. Computed in the logits' dtype (callers pass fp32)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(denom == 0, 1.0, denom)


def attention_mask(
    q_slots: jax.Array, kv_len: int, lengths: jax.Array, sliding_window: int | None, first: jax.Array | None = None
) -> jax.Array:
    """Boolean `[batch, q_len, kv_len]`: causal by slot, within `[first, lengths)`, inside the window.

    q_slots: int32 `[batch, q_len]`, the slot each query occupies; keys sit at slots 0..kv_len-1; lengths: int32
    `[batch]`; first: int32 `[batch]`, the first valid slot (a compressed layer's; None: 0)."""
    kv_slots = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    q = q_slots[:, :, None]
    mask = (kv_slots <= q) & (kv_slots < lengths[:, None, None])
    if first is not None:
        mask &= kv_slots >= first[:, None, None]
    if sliding_window is not None:
        mask &= q - kv_slots < sliding_window
    return mask


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask_fn: MaskFn, scale: float, q_chunk: int = 1024
) -> jax.Array:
    """Softmax attention in plain XLA under a mask computed chunk by chunk; the reference for every kernel.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`.
    mask_fn(rows) -> bool `[batch, 1 or heads, len(rows), kv_len]`, rows: int32 `[chunk]` query indices
    (0-based within q), so per-head sparse patterns never materialise a full `[q_len, kv_len]` mask.
    GQA groups queries per KV head instead of repeating K/V. Logits and softmax are fp32; rows with no
    allowed key return zeros. Queries run in chunks of `q_chunk`: memory is O(q_chunk * kv_len).
    Returns `[batch, q_len, heads, head_dim]` in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    precision = float32_precision(q)

    def block(q_blk, rows):
        qg = q_blk.reshape(batch, -1, kv_heads, groups, head_dim)
        logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32, precision=precision) * scale
        m = mask_fn(rows)
        m = (
            m.reshape(batch, -1, 1, *m.shape[2:])
            if m.shape[1] == 1
            else m.reshape(batch, kv_heads, groups, *m.shape[2:])
        )
        probs = masked_softmax(logits, m)
        out = jnp.einsum(
            "bkgqt,btkd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision
        )
        return out.reshape(batch, -1, heads, head_dim).astype(q.dtype)

    if q_len <= q_chunk:
        return block(q, jnp.arange(q_len, dtype=jnp.int32))
    num_chunks = -(-q_len // q_chunk)
    pad = num_chunks * q_chunk - q_len
    q_c = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, num_chunks, q_chunk, heads, head_dim)
    rows = jnp.arange(num_chunks * q_chunk, dtype=jnp.int32).reshape(num_chunks, q_chunk)
    out = jax.lax.map(lambda xs: block(*xs), (q_c.swapaxes(0, 1), rows))
    return out.swapaxes(0, 1).reshape(batch, num_chunks * q_chunk, heads, head_dim)[:, :q_len]


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, q_chunk: int = 1024
) -> jax.Array:
    """`masked_attention` with a precomputed mask: bool `[batch, q_len, kv_len]` or `[batch, heads, q_len, kv_len]`.

    Shapes and numerics as `masked_attention`.
    """
    q_len = q.shape[1]
    full = mask[:, None] if mask.ndim == 3 else mask

    def mask_fn(rows):
        # rows past q_len (chunk padding) read a clamped row; their outputs are dropped
        return jnp.take(full, jnp.minimum(rows, q_len - 1), axis=2)

    return masked_attention(q, k, v, mask_fn, scale, q_chunk)


def positional_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    q_chunk: int = 512,
    k_chunk: int = 1024,
) -> jax.Array:
    """Causal attention by token position, blocked over queries and keys with an online softmax, in plain XLA.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`; q_pos: int32 `[batch,
    q_len]` and k_pos: int32 `[batch, kv_len]`, each token's position; k_valid: bool `[batch, kv_len]`. A query
    sees a valid key at a position no later than its own (and less than `sliding_window` back). Tokens may come
    in any order, which is what context parallelism's load-balanced layout needs. Key blocks no query of a chunk
    can see are skipped, and each block is recomputed in the backward pass, so memory is O(q_chunk * k_chunk)
    per head in both passes. Returns `[batch, q_len, heads, head_dim]` in q's dtype; fp32 statistics.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    precision = float32_precision(q)
    q_chunk, k_chunk = min(q_chunk, q_len), min(k_chunk, kv_len)
    nq, nk = -(-q_len // q_chunk), -(-kv_len // k_chunk)

    def blocks(x, n, size, fill=0):
        x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, n, size, *x.shape[2:]), 1, 0)

    k_b, v_b = blocks(k, nk, k_chunk), blocks(v, nk, k_chunk)
    kp_b, kv_b = blocks(k_pos, nk, k_chunk), blocks(k_valid, nk, k_chunk, False)

    @jax.checkpoint
    def key_block(carry, xs, qg, qp):
        m, l, acc = carry
        kb, vb, kp, valid = xs
        visible = valid[:, None, :] & (kp[:, None, :] <= qp[:, :, None])  # [batch, q_chunk, k_chunk]
        if sliding_window is not None:
            visible &= qp[:, :, None] - kp[:, None, :] < sliding_window
        visible = visible[:, None, None]  # [batch, 1, 1, q_chunk, k_chunk]

        def attend(carry):
            m, l, acc = carry
            s = jnp.einsum("bqkgd,btkd->bkgqt", qg, kb, preferred_element_type=jnp.float32, precision=precision)
            s = jnp.where(visible, s * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - safe[..., None])
            correction = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32,
                            precision=precision)  # fmt: skip
            return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        return jax.lax.cond(jnp.any(visible), attend, lambda c: c, (m, l, acc)), None

    def query_chunk(xs):
        qc, qp = xs
        qg = qc.reshape(batch, q_chunk, kv_heads, groups, head_dim)
        stats = (batch, kv_heads, groups, q_chunk)
        init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros((*stats, head_dim)))
        (_, l, acc), _ = jax.lax.scan(lambda c, x: key_block(c, x, qg, qp), init, (k_b, v_b, kp_b, kv_b))
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # a query with no visible key gives zeros
        return jnp.einsum("bkgqd->bqkgd", out).reshape(batch, q_chunk, heads, head_dim).astype(q.dtype)

    # padded query rows sit at the largest position; their outputs are dropped
    big = jnp.iinfo(jnp.int32).max
    out = jax.lax.map(query_chunk, (blocks(q, nq, q_chunk), blocks(q_pos, nq, q_chunk, big)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, nq * q_chunk, heads, head_dim)[:, :q_len]
