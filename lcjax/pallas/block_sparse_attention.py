"""Block-sparse prefill attention: a Triton-lowered Pallas kernel beside its plain-XLA reference (the Mosaic GPU
kernel for Hopper is `block_sparse_attention_mgpu`; `dispatch.block_sparse_attention` takes raw lists and picks
one per call).

Each (batch, head, query block) names the key blocks it attends; every (query, key) pair inside a named
tile counts (causal: only key <= query), nothing else does. The kernel keeps one query tile in registers and
runs FlashAttention-2's online softmax over the named key tiles, fp32 accumulation, output in q's dtype.

The lists go through `canonicalize_block_indices` first (an XLA pre-pass: two sorts over the lists): it
drops entries past the count, out of range or wholly above the diagonal, counts duplicates once, and puts the
tiles that need no elementwise mask (wholly below the diagonal, inside kv_len) before those that do, so the
kernel runs two loops and pays for the mask only on the few tiles that need it. An index builder that
already emits that form can call `block_sparse_attention_canonical` and skip the pre-pass.

GQA: query head h reads kv head h // (heads // kv_heads) through the BlockSpec index map; K/V are never
repeated in memory. head_dim 96 runs as 128 with zero-padded q, k, v (Triton tiles are powers of two): the
extra zeros change no logit and the padded output columns are dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.numerics import masked_attention
from lcjax.pallas import _common
from lcjax.pallas import _triton_flash as _flash


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_blocks(name: str, **sizes: int) -> None:
    for key, size in sizes.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}: {key}={size} must be a power of two >= 16 (Triton tile sizes).")


def canonicalize_block_indices(
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    causal: bool,
) -> tuple[jax.Array, jax.Array]:
    """The sorted, unique, in-range form of block lists that the kernel runs on.

    block_indices: int32 `[batch, heads, num_q_blocks, max_blocks]` key-block ids; entries at or past
    block_counts (int32 `[batch, heads, num_q_blocks]`) are ignored, duplicates count once, ids outside
    [0, num_kv_blocks) and (causal) tiles wholly above the diagonal are dropped.
    Returns `indices` int32 `[batch, heads, num_q_blocks, max_blocks]`: the tiles needing no mask ascending,
    then those needing the elementwise mask ascending, then zeros; and `schedule` int32
    `[batch, heads, num_q_blocks, 2]`: (tiles needing no mask, all tiles).
    """
    num_q_blocks, num_kv_blocks = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    if block_indices.shape[:3] != block_counts.shape or block_counts.shape[2] != num_q_blocks:
        raise ValueError(
            f"block_indices {block_indices.shape} and block_counts {block_counts.shape} must be "
            f"[batch, heads, {num_q_blocks}, max_blocks] and [batch, heads, {num_q_blocks}] for "
            f"q_len={q_len}, block_q={block_q}."
        )
    j = block_indices.astype(jnp.int32)
    slot = jnp.arange(j.shape[-1], dtype=jnp.int32)
    valid = (slot < block_counts[..., None]) & (j >= 0) & (j < num_kv_blocks)
    plain = (j + 1) * block_k <= kv_len
    if causal:
        q_first = (jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q)[:, None]
        valid &= j * block_k <= q_first + block_q - 1
        plain &= (j + 1) * block_k - 1 <= q_first
    big = 2 * num_kv_blocks
    key = jnp.sort(jnp.where(valid, jnp.where(plain, j, j + num_kv_blocks), big), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
    key = jnp.sort(jnp.where(dup, big, key), axis=-1)
    schedule = jnp.stack([jnp.sum(key < num_kv_blocks, -1), jnp.sum(key < big, -1)], -1).astype(jnp.int32)
    indices = jnp.where(key < num_kv_blocks, key, jnp.where(key < big, key - num_kv_blocks, 0))
    return indices, schedule


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    idx_ref,
    sched_ref,
    *out_refs,
    num_q_blocks: int,
    block_q: int,
    block_k: int,
    kv_len: int,
    causal: bool,
    qk_scale: float,
    q_axis: int,
):
    o_ref = out_refs[-1]  # with a poisoned buffer aliased in, its input ref comes first
    qb = num_q_blocks - 1 - pl.program_id(q_axis)  # see _flash.launch_grid
    q = q_ref[...]
    rows = qb * block_q + jnp.arange(block_q, dtype=jnp.int32)

    def tile(n, state, masked: bool):
        start = pl.multiple_of(idx_ref[n] * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = None
        if masked:
            cols = start + jnp.arange(block_k, dtype=jnp.int32)
            mask = jnp.broadcast_to((cols < kv_len)[None, :], (block_q, block_k))
            if causal:
                mask &= rows[:, None] >= cols[None, :]
        return _flash.update(state, q, k, v, qk_scale, mask)

    state = _flash.init_state(block_q, q.shape[-1])
    state = jax.lax.fori_loop(0, sched_ref[0], functools.partial(tile, masked=False), state)
    state = jax.lax.fori_loop(sched_ref[0], sched_ref[1], functools.partial(tile, masked=True), state)
    o_ref[...] = _flash.finish(state, o_ref.dtype)


def _pallas_forward(
    q,
    k,
    v,
    indices,
    schedule,
    *,
    kv_len: int,
    scale: float,
    causal: bool,
    block_q: int,
    block_k: int,
    interpret: bool,
    num_warps: int | None,
    num_stages: int | None,
    heads_fastest: bool = False,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """The kernel on padded arrays: q `[b, nqb*block_q, h, d]`, k, v `[b, nkb*block_k, kvh, d]`, d a power
    of two. `out_init` (testing): a buffer of q's shape aliased to the output, e.g. NaNs, to prove that the
    kernel writes every element."""
    batch, q_pad, heads, head_dim = q.shape
    kv_pad, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    nqb = q_pad // block_q
    grid, spec, q_axis = _flash.launch_grid(heads, nqb, batch, heads_fastest)
    kernel = functools.partial(
        _kernel,
        num_q_blocks=nqb,
        block_q=block_q,
        block_k=block_k,
        kv_len=kv_len,
        causal=causal,
        qk_scale=scale * _common.LOG2E,
        q_axis=q_axis,
    )
    q_spec, kv_spec = _flash.qkv_specs(spec, block_q, kv_pad, head_dim, groups)
    in_specs = [
        q_spec,
        kv_spec,
        kv_spec,
        spec((None, None, None, indices.shape[-1]), lambda h, i, b: (b, h, i, 0)),
        spec((None, None, None, 2), lambda h, i, b: (b, h, i, 0)),
    ]
    args = [q, k, v, indices, schedule]
    return _flash.launch(
        kernel,
        grid=grid,
        in_specs=in_specs,
        args=args,
        out_spec=q_spec,
        out_like=q,
        tile_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="block_sparse_attention",
        out_init=out_init,
    )


@functools.partial(
    jax.jit,
    static_argnames=("scale", "causal", "block_q", "block_k", "interpret", "num_warps", "num_stages", "heads_fastest"),
)
def block_sparse_attention_canonical(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    schedule: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_fastest: bool = False,
) -> jax.Array:
    """`block_sparse_attention` on lists already in `canonicalize_block_indices`' form (not re-checked:
    duplicates there would be counted twice)."""
    _common.check_inputs("block_sparse_attention", q, k, v)
    _check_blocks("block_sparse_attention", block_q=block_q, block_k=block_k)
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if causal and q_len != kv_len:
        raise ValueError(
            f"causal block_sparse_attention is prefill from position 0: q_len={q_len} must equal kv_len={kv_len}."
        )
    d_pad = _common.padded_head_dim(head_dim)

    def run(q, k, v, lists):
        q_p = _common.pad_to(_common.pad_to(q, 1, _cdiv(q_len, block_q) * block_q), 3, d_pad)
        k_p = _common.pad_to(_common.pad_to(k, 1, _cdiv(kv_len, block_k) * block_k), 3, d_pad)
        v_p = _common.pad_to(_common.pad_to(v, 1, _cdiv(kv_len, block_k) * block_k), 3, d_pad)
        out = _pallas_forward(
            q_p,
            k_p,
            v_p,
            *lists,
            kv_len=kv_len,
            scale=scale,
            causal=causal,
            block_q=block_q,
            block_k=block_k,
            interpret=interpret,
            num_warps=num_warps,
            num_stages=num_stages,
            heads_fastest=heads_fastest,
        )
        return out[:, :q_len, :, :head_dim]

    return _common.by_head_groups(
        run, q, k, v, (indices, schedule), padded_len=_cdiv(q_len, block_q) * block_q, padded_head_dim=d_pad
    )


def block_sparse_mask_fn(
    block_indices: jax.Array, block_counts: jax.Array, *, kv_len: int, block_q: int, block_k: int, causal: bool
):
    """mask_fn(rows) -> bool `[batch, heads, len(rows), kv_len]`: the pairs the block lists allow, for
    `lcjax.numerics.masked_attention` (no full `[q_len, kv_len]` mask is built)."""
    batch, heads, nqb, max_blocks = block_indices.shape
    nkb = _cdiv(kv_len, block_k)
    j = block_indices.astype(jnp.int32)
    valid = (jnp.arange(max_blocks) < block_counts[..., None]) & (j >= 0) & (j < nkb)
    b, h, i = jnp.meshgrid(jnp.arange(batch), jnp.arange(heads), jnp.arange(nqb), indexing="ij")
    blocks = jnp.zeros((batch, heads, nqb, nkb + 1), bool)
    blocks = blocks.at[b[..., None], h[..., None], i[..., None], jnp.where(valid, j, nkb)].set(True)[..., :nkb]
    keys = jnp.arange(kv_len, dtype=jnp.int32)

    def mask_fn(rows):
        allowed = blocks[:, :, jnp.minimum(rows // block_q, nqb - 1)][:, :, :, keys // block_k]
        return allowed & (rows[:, None] >= keys[None, :]) if causal else allowed

    return mask_fn


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k"))
def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    block_q: int = 64,
    block_k: int = 64,
) -> jax.Array:
    """`block_sparse_attention` in plain XLA: masked softmax attention under the lists' per-head mask."""
    mask_fn = block_sparse_mask_fn(
        block_indices, block_counts, kv_len=k.shape[1], block_q=block_q, block_k=block_k, causal=causal
    )
    return masked_attention(q, k, v, mask_fn, scale, q_chunk=512)
