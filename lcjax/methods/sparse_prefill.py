"""Shared plumbing of sparse-prefill attention transforms: prefill runs a `SparsePattern`, decode stays dense.

A method supplies `pattern(q, k, meta) -> SparsePattern`; `sparse_prefill` writes the cache, builds the
pattern and executes it with the chosen backend ("xla": the exact reference, any device; "pallas": the
GPU kernels in `lcjax.pallas`; "auto": pallas on GPU, xla elsewhere).
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from lcjax.attention import AttentionMeta, DenseAttention
from lcjax.methods.sparse_pattern import SparsePattern, pattern_attention_reference

Backend = Literal["auto", "xla", "pallas"]


def run_pattern(q: jax.Array, k: jax.Array, v: jax.Array, pattern: SparsePattern, meta: AttentionMeta,
                backend: Backend = "auto") -> jax.Array:
    """Attention of `q [batch, seq, heads, head_dim]` over `k, v [batch, seq, kv_heads, head_dim]` under `pattern`."""
    use_pallas = backend == "pallas" or (backend == "auto" and jax.default_backend() == "gpu")
    if use_pallas:
        from lcjax.pallas.pattern_attention import pattern_attention  # GPU-only import path
        return pattern_attention(q, k, v, pattern, meta.lengths, meta.scale, meta.sliding_window)
    return pattern_attention_reference(q, k, v, pattern, meta.lengths, meta.scale,
                                       sliding_window=meta.sliding_window)


def sparse_prefill(q, k, v, cache, meta: AttentionMeta, make_pattern: Callable[..., SparsePattern],
                   backend: Backend, dense: DenseAttention = DenseAttention()):
    """The body of every sparse-prefill transform's `__call__` (see module docstring)."""
    if meta.phase != "prefill":
        return dense(q, k, v, cache, meta)
    if cache is not None:
        cache = cache.update(meta.layer, k, v, meta.start)
    pattern = make_pattern(q, k, meta)
    return run_pattern(q, k, v, pattern, meta, backend), cache


def budget_mask(indices: jax.Array, budgets: jax.Array) -> jax.Array:
    """Sets entries at rank >= budget to -1. indices `[batch, heads, n]` (best first), budgets int `[heads]`."""
    rank = jnp.arange(indices.shape[-1])
    return jnp.where(rank[None, None, :] < budgets[None, :, None], indices, -1)


def last_rows(lengths: jax.Array, last_q: int) -> jax.Array:
    """int32 `[batch, last_q]`: the last `last_q` query rows of each right-padded sequence (clipped at 0)."""
    return jnp.maximum(lengths[:, None] - last_q + jnp.arange(last_q, dtype=jnp.int32)[None, :], 0)
