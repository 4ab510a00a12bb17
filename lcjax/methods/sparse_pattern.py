"""The one sparse-prefill pattern every MInference-style method produces, and its exact reference execution.

A `SparsePattern` says, per (sequence, head), which keys each query may see, in the three shapes
MInference uses: vertical lines (key columns every query sees), slash lines (diagonals: query i sees key
i - d), and blocks (query block m sees key block n). A-shape is verticals 0..n_init-1 plus slashes
0..n_local-1; vertical-slash is estimated lines; block-sparse is estimated blocks. Causality and the
sequence length always apply; the union is counted once. `pattern_attention_reference` computes exactly
that in XLA (chunked, so memory stays O(chunk x keys)); the Pallas kernels are checked against it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.numerics import masked_attention
from lcjax.pallas.vertical_slash_ranges import SEMANTICS as SLASH_SEMANTICS  # one list for kernel and pattern
from lcjax.pallas.vertical_slash_ranges import cover_mask_fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparsePattern:
    """Per-head sparse attention pattern for one prefill; negative entries are unused slots.

    vertical: int32 `[batch, heads, n_vertical]` key columns.
    slash: int32 `[batch, heads, n_slash]` diagonal offsets d >= 0 (query i sees key i - d).
    blocks: int32 `[batch, heads, num_q_blocks, n_blocks]` key-block ids per query block, or None.
    block_size: query/key block size of `blocks`.
    dense_last: each sequence's last `dense_last` queries see every causal key (Tri-shape); 0 = none.
    slash_semantics: "exact" (query i sees key i - d for each slash offset d) or "cover" (MInference's
      kernel semantics, a superset: a query block of `block_size` rows sees every key of the ranges MInference
      merges from its slash windows, see `lcjax.pallas.vertical_slash_ranges.cover_mask_fn`).
    """

    vertical: jax.Array
    slash: jax.Array
    blocks: jax.Array | None = None
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    dense_last: int = dataclasses.field(default=0, metadata=dict(static=True))
    slash_semantics: str = dataclasses.field(default="exact", metadata=dict(static=True))

    def __post_init__(self):
        if self.slash_semantics not in SLASH_SEMANTICS:
            raise ValueError(f"slash_semantics={self.slash_semantics!r}; choose one of {SLASH_SEMANTICS}.")


def _table(indices: jax.Array, size: int) -> jax.Array:
    """bool `[..., size]`: True at each non-negative index (out-of-range ones are dropped)."""
    if indices.shape[-1] == 0:
        return jnp.zeros((*indices.shape[:-1], size), bool)
    flat = indices.reshape(-1, indices.shape[-1])
    valid = (flat >= 0) & (flat < size)
    table = jnp.zeros((flat.shape[0], size), bool)
    rows = jnp.arange(flat.shape[0])[:, None]
    table = table.at[rows, jnp.where(valid, flat, size)].set(True, mode="drop")
    return table.reshape(*indices.shape[:-1], size)


def pattern_mask_fn(pattern: SparsePattern, kv_len: int, lengths: jax.Array, sliding_window: int | None = None):
    """mask_fn(rows) -> bool `[batch, heads, len(rows), kv_len]` for `lcjax.numerics.masked_attention`.

    A model's own sliding window (Mistral) still applies on top of the pattern.
    """
    vertical = _table(pattern.vertical, kv_len)  # [b, h, kv]
    slash = _table(pattern.slash, kv_len)  # [b, h, offsets]
    blocks = None
    if pattern.blocks is not None:
        nkb = -(-kv_len // pattern.block_size)
        blocks = _table(pattern.blocks, nkb)  # [b, h, nqb, nkb]
    keys = jnp.arange(kv_len, dtype=jnp.int32)
    cover = None
    if pattern.slash_semantics == "cover":
        cover = cover_mask_fn(pattern.vertical, pattern.slash, kv_len, pattern.block_size)

    def mask_fn(rows):
        i = rows[:, None]
        offset = i - keys[None, :]  # [chunk, kv]
        causal = (offset >= 0)[None, None] & (keys < lengths[:, None])[:, None, None, :]
        if sliding_window is not None:
            causal &= (offset < sliding_window)[None, None]
        if cover is not None:
            allowed = cover(rows)
        else:
            allowed = vertical[:, :, None, :] | jnp.take(slash, jnp.clip(offset, 0, kv_len - 1), axis=2)
        if blocks is not None:
            qb = jnp.minimum(rows // pattern.block_size, blocks.shape[2] - 1)
            kb = keys // pattern.block_size
            allowed |= blocks[:, :, qb][:, :, :, kb]
        if pattern.dense_last:
            dense_from = lengths - pattern.dense_last
            allowed |= (rows[None, :] >= dense_from[:, None])[:, None, :, None]
        return causal & allowed

    return mask_fn


def pattern_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: SparsePattern,
    lengths: jax.Array,
    scale: float,
    q_chunk: int = 512,
    sliding_window: int | None = None,
) -> jax.Array:
    """Exact attention under `pattern` in XLA. q `[batch, seq, heads, head_dim]`, k/v `[batch, seq, kv_heads,
    head_dim]`, lengths `[batch]`; returns `[batch, seq, heads, head_dim]`."""
    mask_fn = pattern_mask_fn(pattern, k.shape[1], lengths, sliding_window)
    return masked_attention(q, k, v, mask_fn, scale, q_chunk)


def pattern_density(pattern: SparsePattern, q_len: int, lengths: jax.Array) -> jax.Array:
    """Fraction of causal (query, key) pairs the pattern computes, float32 `[batch, heads]` (for reports)."""
    mask_fn = pattern_mask_fn(pattern, q_len, lengths)
    allowed = mask_fn(jnp.arange(q_len, dtype=jnp.int32)).sum(axis=(2, 3))
    causal = (lengths * (lengths + 1) // 2)[:, None]
    return allowed / causal


def tile_fraction(mask_fn, q_len: int, lengths: jax.Array, tile: int = 64, chunk: int = 256) -> jax.Array:
    """float32 `[heads]`: the share of causal `tile` x `tile` tiles with at least one allowed pair (a tiled
    kernel computes such a tile whole), summed over the batch. mask_fn as `pattern_mask_fn` returns."""
    chunk = min(chunk, -(-q_len // tile) * tile) // tile * tile
    nkb = -(-q_len // tile)
    key_pad = nkb * tile - q_len
    keys = jnp.arange(q_len, dtype=jnp.int32)

    def per_chunk(c):
        rows = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        ok = (keys[None, :] <= rows[:, None]) & (rows < q_len)[:, None]
        m = jnp.pad(mask_fn(rows) & ok[None, None], ((0, 0), (0, 0), (0, 0), (0, key_pad)))
        b, h = m.shape[:2]
        return m.reshape(b, h, chunk // tile, tile, nkb, tile).any(axis=(3, 5)).sum(axis=(0, 2, 3))

    counts = jax.lax.map(per_chunk, jnp.arange(-(-q_len // chunk))).sum(0)
    causal_tiles = jnp.sum((-(-lengths // tile)) * (-(-lengths // tile) + 1) // 2)
    return counts / causal_tiles
