"""MInference's vertical-slash sparse prefill attention: a Triton-lowered Pallas kernel and its XLA reference.

Query i attends key j iff j <= i and (j is a vertical column or i - j is a slash offset), exactly: unlike
MInference's kernel, which attends every key of a covered range, tiles that are not wholly on slashes apply
that mask elementwise. Per query block the kernel runs one online softmax over (1) the plain tiles from
`build_vertical_slash_index`, unmasked, (2) its masked tiles, (3) the remaining vertical columns, gathered in
chunks of `block` keys. GQA reads kv head h // (heads // kv_heads); head_dim 96 runs zero-padded to 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.numerics import masked_attention
from lcjax.pallas import _common
from lcjax.pallas import _triton_flash as _flash
from lcjax.pallas.vertical_slash_index import (
    VerticalSlashIndex,
    build_vertical_slash_index,
    slash_window_mask,
    words_for,
)

__all__ = [
    "VerticalSlashIndex",
    "build_vertical_slash_index",
    "vertical_slash_attention",
    "vertical_slash_attention_reference",
    "vertical_slash_mask_fn",
]

SLASH_MASKS = ("bits", "gather")


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    plain_ref,
    masked_ref,
    counts_ref,
    cols_ref,
    vert_ref,
    slash_ref,
    words_ref,
    *out_refs,
    num_q_blocks: int,
    block: int,
    qk_scale: float,
    q_axis: int,
    slash_mask: str,
):
    o_ref = out_refs[-1]  # with a poisoned buffer aliased in, its input ref comes first
    qb = num_q_blocks - 1 - pl.program_id(q_axis)  # see _flash.launch_grid
    q = q_ref[...]
    lane = jnp.arange(block, dtype=jnp.int32)
    rows = qb * block + lane

    def kv_tile(t):
        start = pl.multiple_of((qb - t) * block, block)
        return start, k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]

    def plain_tile(n, state):
        _, k, v = kv_tile(plain_ref[n])
        return _flash.update(state, q, k, v, qk_scale)

    def masked_tile(n, state):
        t = masked_ref[n]
        start, k, v = kv_tile(t)
        offset = t * block + lane[:, None] - lane[None, :]  # query - key
        if slash_mask == "bits":  # the tile's offsets are t*b - b + 1 + [0, 2b - 1)
            base = t * block - block + 1
            on_slash = slash_window_mask(words_ref, base, offset - base, block)
        else:
            on_slash = slash_ref[jnp.maximum(offset, 0)] != 0
        on_vertical = vert_ref[pl.ds(start, block)] != 0
        mask = (offset >= 0) & (on_slash | on_vertical[None, :])
        return _flash.update(state, q, k, v, qk_scale, mask)

    state = _flash.init_state(block, q.shape[-1])
    state = jax.lax.fori_loop(0, counts_ref[0], plain_tile, state)
    state = jax.lax.fori_loop(0, counts_ref[1], masked_tile, state)
    state = _flash.gather_columns(state, q, k_ref, v_ref, cols_ref, counts_ref[2], rows, block, qk_scale)
    o_ref[...] = _flash.finish(state, o_ref.dtype)


def _pallas_forward(
    q,
    k,
    v,
    index: VerticalSlashIndex,
    *,
    scale: float,
    interpret: bool,
    num_warps: int | None,
    num_stages: int | None,
    heads_fastest: bool = False,
    slash_mask: str = "gather",
    out_init: jax.Array | None = None,
):
    """The kernel on padded arrays: q `[b, L, h, d]`, k, v `[b, L, kvh, d]`, L = nqb * block, d a power of
    two. `out_init` (testing): a buffer of q's shape aliased to the output, to prove every element is written."""
    batch, padded, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    block = index.block
    nqb = padded // block
    counts = jnp.stack(
        [index.plain_counts, index.masked_counts, index.column_counts, jnp.zeros_like(index.column_counts)], axis=-1
    )
    grid, spec, q_axis = _flash.launch_grid(heads, nqb, batch, heads_fastest)
    kernel = functools.partial(
        _kernel,
        num_q_blocks=nqb,
        block=block,
        qk_scale=scale * _common.LOG2E,
        q_axis=q_axis,
        slash_mask=check_slash_mask(slash_mask),
    )
    q_spec, kv_spec = _flash.qkv_specs(spec, block, padded, head_dim, groups)
    per_head = spec((None, None, nqb), lambda h, i, b: (b, h, 0))
    per_block = lambda n: spec((None, None, None, n), lambda h, i, b: (b, h, i, 0))
    per_key = spec((None, None, padded), lambda h, i, b: (b, h, 0))
    words = words_for(index, slash_mask)
    in_specs = [
        q_spec,
        kv_spec,
        kv_spec,
        per_head,
        per_head,
        per_block(4),
        per_block(index.column_indices.shape[-1]),
        per_key,
        per_key,
        spec((None, None, words.shape[-1]), lambda h, i, b: (b, h, 0)),
    ]
    args = [
        q,
        k,
        v,
        index.diag_plain,
        index.diag_masked,
        counts,
        index.column_indices,
        index.is_vertical,
        index.is_slash,
        words,
    ]
    return _flash.launch(
        kernel,
        grid=grid,
        in_specs=in_specs,
        args=args,
        out_spec=q_spec,
        out_like=q,
        tile_k=block,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="vertical_slash_attention",
        out_init=out_init,
    )


@functools.partial(
    jax.jit, static_argnames=("scale", "interpret", "num_warps", "num_stages", "heads_fastest", "slash_mask")
)
def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_fastest: bool = False,
    slash_mask: str = "gather",
) -> jax.Array:
    """Causal prefill attention over a vertical-slash pattern.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, q_len, kv_heads, head_dim]` (keys and queries both
    from position 0); bfloat16, float16 or float32; head_dim 64, 96 or 128. index: from
    `build_vertical_slash_index(..., q_len)` for the same batch and heads. Returns `[batch, q_len, heads,
    head_dim]` in q's dtype; rows with no allowed key are zeros. num_warps, num_stages (Triton),
    heads_fastest (grid order, see `_flash.launch_grid`) and slash_mask (how masked tiles find their slash
    pairs: "gather" from `index.is_slash` per element, or "bits" from `slash_words(index.is_slash)`; gather measured
    faster on the H100, docs/kernel-notes.md) tune speed only.
    """
    return run_schedule(
        "vertical_slash_attention",
        _pallas_forward,
        q,
        k,
        v,
        index,
        index.plain_counts,
        scale=scale,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        heads_fastest=heads_fastest,
        slash_mask=slash_mask,
    )


def check_slash_mask(slash_mask: str) -> str:
    if slash_mask not in SLASH_MASKS:
        raise ValueError(f"slash_mask={slash_mask!r}; choose one of {SLASH_MASKS}.")
    return slash_mask


def run_schedule(name: str, forward, q, k, v, index, per_block_counts: jax.Array, **kernel_args) -> jax.Array:
    """Checks shapes, pads q/k/v to the index's padded length and a power-of-two head_dim, runs a
    vertical-slash schedule's `forward` and crops. per_block_counts: any `[batch, heads, nqb]` index field."""
    _common.check_inputs(name, q, k, v)
    batch, q_len, heads, head_dim = q.shape
    if k.shape[1] != q_len or index.q_len != q_len:
        raise ValueError(
            f"{name} is causal prefill: q_len={q_len}, kv_len={k.shape[1]} and the index's "
            f"q_len={index.q_len} must agree."
        )
    if per_block_counts.shape[:2] != (batch, heads):
        raise ValueError(
            f"{name}: the index is for [batch, heads]={per_block_counts.shape[:2]}, q has {(batch, heads)}."
        )
    padded = index.is_slash.shape[-1]
    d_pad = _common.padded_head_dim(head_dim)

    def run(q, k, v, index):
        q_p, k_p, v_p = (_common.pad_to(_common.pad_to(x, 1, padded), 3, d_pad) for x in (q, k, v))
        return forward(q_p, k_p, v_p, index, **kernel_args)[:, :q_len, :, :head_dim]

    return _common.by_head_groups(run, q, k, v, index, padded_len=padded, padded_head_dim=d_pad)


def vertical_slash_mask_fn(vertical_indices: jax.Array, slash_offsets: jax.Array, q_len: int):
    """mask_fn(rows) -> bool `[batch, heads, len(rows), q_len]`, exactly causal & (key in verticals |
    query - key in slashes), for `lcjax.numerics.masked_attention`; entries outside [0, q_len) match nothing."""

    def table(x):  # bool [batch, heads, q_len]; negatives must not wrap around in .at[]
        x = jnp.where((x >= 0) & (x < q_len), x, q_len)
        b = jnp.arange(x.shape[0])[:, None, None]
        h = jnp.arange(x.shape[1])[None, :, None]
        return jnp.zeros((*x.shape[:2], q_len + 1), bool).at[b, h, x].set(True)[..., :q_len]

    is_vertical, is_slash = table(vertical_indices), table(slash_offsets)
    keys = jnp.arange(q_len, dtype=jnp.int32)

    def mask_fn(rows):
        offset = rows[:, None] - keys[None, :]
        on_slash = jnp.take(is_slash, jnp.clip(offset, 0, q_len - 1), axis=-1)  # [batch, heads, rows, keys]
        return (offset >= 0) & (on_slash | is_vertical[:, :, None, :])

    return mask_fn


@functools.partial(jax.jit, static_argnames=("scale",))
def vertical_slash_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, vertical_indices: jax.Array, slash_offsets: jax.Array, scale: float
) -> jax.Array:
    """`vertical_slash_attention` in plain XLA: masked softmax attention under the exact per-head mask."""
    return masked_attention(
        q, k, v, vertical_slash_mask_fn(vertical_indices, slash_offsets, q.shape[1]), scale, q_chunk=512
    )
