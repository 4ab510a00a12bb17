"""Shared plumbing of sparse-prefill attention transforms: prefill runs a `SparsePattern`, decode stays dense.

A method supplies `pattern(q, k, meta) -> SparsePattern`; `sparse_prefill` writes the cache, builds the
pattern and executes it with the chosen backend ("xla": the exact reference, any device; "pallas": the
GPU kernels in `lcjax.pallas`; "auto": pallas on GPU, xla elsewhere).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.methods.sparse_pattern import SparsePattern, pattern_attention_reference, pattern_mask_fn, tile_fraction
from lcjax.models.attention import AttentionMeta, DenseAttention
from lcjax.models.transformer import forward
from lcjax.numerics import masked_attention
from lcjax.pallas import dispatch

Backend = Literal["auto", "xla", "pallas"]


def run_pattern(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: SparsePattern, meta: AttentionMeta, backend: Backend = "auto"
) -> jax.Array:
    """Attention of `q [batch, seq, heads, head_dim]` over `k, v [batch, seq, kv_heads, head_dim]` under `pattern`.

    The Pallas kernels do not model a sliding window (Mistral), so such models run the XLA reference.
    """
    use_pallas = backend == "pallas" or (backend == "auto" and jax.default_backend() == "gpu")
    if use_pallas and meta.sliding_window is None:
        return pallas_pattern_attention(
            q, k, v, pattern, meta.lengths, meta.scale, interpret=jax.default_backend() == "cpu"
        )
    return pattern_attention_reference(q, k, v, pattern, meta.lengths, meta.scale, sliding_window=meta.sliding_window)


def pallas_pattern_attention(
    q, k, v, pattern: SparsePattern, lengths: jax.Array, scale: float, interpret: bool = False
) -> jax.Array:
    """`pattern` through the Pallas kernels: vertical-slash lines in one kernel, blocks in the other (on an
    sm_90 GPU with 16-bit inputs the Mosaic GPU kernels, elsewhere the Triton-lowered ones).

    Each head must use lines or blocks, not both (MInference assigns one kind per head): a head whose
    block list is non-empty takes the block kernel's output. Tri-shape's dense tail is recomputed exactly.
    Rows past a sequence's length are garbage (as they are for dense attention).
    """
    bs = pattern.block_size
    out = dispatch.vertical_slash_attention(
        q,
        k,
        v,
        pattern.vertical,
        pattern.slash,
        scale=scale,
        semantics=pattern.slash_semantics,
        block=bs,
        interpret=interpret,
    )
    if pattern.blocks is not None:
        counts = (pattern.blocks >= 0).sum(-1).astype(jnp.int32)
        blocks = jnp.sort(jnp.where(pattern.blocks >= 0, pattern.blocks, jnp.iinfo(jnp.int32).max), axis=-1)
        by_blocks = dispatch.block_sparse_attention(
            q, k, v, blocks, counts, scale=scale, block_q=bs, block_k=bs, interpret=interpret
        )
        block_head = (counts > 0).any(axis=2)  # [batch, heads]
        out = jnp.where(block_head[:, None, :, None], by_blocks, out)
    if pattern.dense_last:
        out = _dense_tail(q, k, v, out, lengths, pattern.dense_last, scale)
    return out


def _dense_tail(q, k, v, out, lengths, n_last: int, scale: float):
    """Overwrites each sequence's last `n_last` rows of `out` with exact causal attention."""

    seq = q.shape[1]
    rows = jnp.clip(lengths[:, None] - n_last + jnp.arange(n_last, dtype=jnp.int32)[None, :], 0, seq - 1)
    q_tail = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
    keys = jnp.arange(seq, dtype=jnp.int32)

    def mask_fn(t):
        r = rows[:, jnp.minimum(t, n_last - 1)]  # [batch, chunk]
        return ((keys[None, None, :] <= r[:, :, None]) & (keys[None, None, :] < lengths[:, None, None]))[:, None]

    tail = masked_attention(q_tail, k, v, mask_fn, scale)
    return out.at[jnp.arange(out.shape[0])[:, None], rows].set(tail)


def sparse_prefill(
    q,
    k,
    v,
    cache,
    meta: AttentionMeta,
    make_pattern: Callable[..., SparsePattern],
    backend: Backend,
    dense: DenseAttention = DenseAttention(),
):
    """The body of every sparse-prefill transform's `__call__` (see module docstring)."""
    if meta.phase != "prefill":
        return dense(q, k, v, cache, meta)
    if cache is not None:
        cache = cache.update(meta.layer, k, v, meta.start, meta.lengths)
    pattern = make_pattern(q, k, meta)
    return run_pattern(q, k, v, pattern, meta, backend), cache


def budget_mask(indices: jax.Array, budgets: jax.Array) -> jax.Array:
    """Sets entries at rank >= budget to -1. indices `[batch, heads, n]` (best first), budgets int `[heads]`."""
    rank = jnp.arange(indices.shape[-1])
    return jnp.where(rank[None, None, :] < budgets[None, :, None], indices, -1)


def last_rows(lengths: jax.Array, last_q: int) -> jax.Array:
    """int32 `[batch, last_q]`: the last `last_q` query rows of each right-padded sequence (clipped at 0)."""
    return jnp.maximum(lengths[:, None] - last_q + jnp.arange(last_q, dtype=jnp.int32)[None, :], 0)


@dataclasses.dataclass(frozen=True)
class _TileCostProbe:
    """Runs a sparse method and records, per layer and head, the share of causal tiles its pattern visits
    (threaded through the layer scan in place of a KV cache)."""

    method: object
    tile: int = 64

    def __call__(self, q, k, v, costs, meta):
        pattern = self.method.pattern(q, k, meta)
        out = run_pattern(q, k, v, pattern, meta, getattr(self.method, "backend", "auto"))
        mask_fn = pattern_mask_fn(pattern, q.shape[1], meta.lengths, meta.sliding_window)
        return out, costs.at[meta.layer].set(tile_fraction(mask_fn, q.shape[1], meta.lengths, self.tile))


def tile_costs(model, method, tokens, tile: int = 64) -> np.ndarray:
    """float32 `[layers, heads]`: the share of causal `tile`-square tiles `method` computes when prefilling
    `tokens: int [seq]` (what a tiled sparse kernel's time scales with; dense is 1)."""
    tokens = jnp.asarray(tokens, jnp.int32).reshape(1, -1)
    cfg = model.config
    seq = tokens.shape[1]

    @jax.jit
    def run(params, tokens):
        costs = jnp.zeros((cfg.num_layers, cfg.num_heads), jnp.float32)
        _, costs = forward(
            params,
            cfg,
            tokens,
            jnp.arange(seq, dtype=jnp.int32)[None],
            jnp.zeros((1,), jnp.int32),
            jnp.full((1,), seq, jnp.int32),
            costs,
            "prefill",
            _TileCostProbe(method, tile),
            model.positions,
        )
        return costs

    return np.asarray(run(model.params, tokens))
