"""Which kernel runs a sparse-prefill call: the Mosaic GPU kernels on Hopper (sm_90, 16-bit inputs) where they
apply, the Triton-lowered ones elsewhere (any CUDA GPU, float32, and interpret mode on the CPU); for
vertical-slash, also the schedule its semantics need. Callers above `lcjax.pallas` go through here, so a new
backend or schedule changes this file only.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax

from lcjax.pallas.block_sparse_attention import block_sparse_attention_canonical, canonicalize_block_indices
from lcjax.pallas.block_sparse_attention_mgpu import block_sparse_attention_mgpu, runs_on_hopper
from lcjax.pallas.vertical_slash_attention import vertical_slash_attention as vertical_slash_tiles
from lcjax.pallas.vertical_slash_attention_mgpu import build_mgpu_index, vertical_slash_attention_mgpu
from lcjax.pallas.vertical_slash_index import build_vertical_slash_index
from lcjax.pallas.vertical_slash_ranges import (
    build_vertical_slash_ranges,
    check_semantics,
    vertical_slash_attention_ranges,
)

Implementation = Literal["auto", "mosaic", "triton"]
IMPLEMENTATIONS = ("auto", "mosaic", "triton")
MOSAIC_TILES = (64, 128)  # wgmma tile widths the Mosaic block-sparse kernel runs
MOSAIC_VS_BLOCK = 64  # the Mosaic vertical-slash kernel's query block and key chunk


def _check_implementation(name: str, implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{name}: implementation={implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}.")


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "causal",
        "block_q",
        "block_k",
        "interpret",
        "num_warps",
        "num_stages",
        "heads_fastest",
        "implementation",
    ),
)
def block_sparse_attention(
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
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_fastest: bool = False,
    implementation: Implementation = "auto",
) -> jax.Array:
    """Attention over the named key blocks of each query block.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`, heads a multiple of
    kv_heads; bfloat16, float16 or float32; head_dim 64, 96 or 128. block_indices: int32 `[batch, heads,
    ceil(q_len / block_q), max_blocks]` key-block ids (key block j = keys [j * block_k, (j + 1) * block_k));
    block_counts: int32 `[batch, heads, ceil(q_len / block_q)]`, entries at or past it are ignored; duplicates
    count once. Causal: q_len == kv_len, both from position 0, key <= query inside the diagonal tiles. Rows with
    no allowed key are zeros. Returns `[batch, q_len, heads, head_dim]` in q's dtype.
    implementation: "mosaic" (`block_sparse_attention_mgpu`: wgmma + TMA; num_stages = its K/V slots), "triton"
    (`block_sparse_attention`: any CUDA GPU, and `interpret=True` on the CPU) or "auto" (mosaic on Hopper for
    16-bit inputs and 64/128-wide tiles). num_warps, num_stages and heads_fastest (grid order) tune speed only.
    """
    _check_implementation("block_sparse_attention", implementation)
    indices, schedule = canonicalize_block_indices(
        block_indices,
        block_counts,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        block_q=block_q,
        block_k=block_k,
        causal=causal,
    )
    mosaic_fits = block_q in MOSAIC_TILES and block_k in MOSAIC_TILES and runs_on_hopper(q, interpret)
    if implementation == "mosaic" or (implementation == "auto" and mosaic_fits):
        return block_sparse_attention_mgpu(
            q,
            k,
            v,
            indices,
            schedule,
            scale=scale,
            causal=causal,
            block_q=block_q,
            block_k=block_k,
            stages=num_stages or 2,
        )
    return block_sparse_attention_canonical(
        q,
        k,
        v,
        indices,
        schedule,
        scale=scale,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        heads_fastest=heads_fastest,
    )


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    vertical: jax.Array,
    slash: jax.Array,
    *,
    scale: float,
    semantics: str = "exact",
    block: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Causal prefill attention over per-head vertical columns and slash offsets.

    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]`; vertical, slash: int32
    `[batch, heads, n]` key columns and diagonal offsets (negative entries unused).
    semantics: "exact" (query i sees key i - d for each slash d; the tile schedule,
    `vertical_slash_attention.vertical_slash_attention`) or "cover" (MInference's kernel semantics, whole
    merged ranges: the Mosaic GPU kernel on Hopper with 64-wide blocks, else the Triton range schedule).
    Returns `[batch, seq, heads, head_dim]` in q's dtype.
    """
    check_semantics(semantics)
    seq = q.shape[1]
    if semantics == "cover" and block == MOSAIC_VS_BLOCK and runs_on_hopper(q, interpret):
        return vertical_slash_attention_mgpu(q, k, v, *build_mgpu_index(vertical, slash, seq), scale=scale)
    if semantics == "cover":
        ranges = build_vertical_slash_ranges(vertical, slash, seq, block, semantics="cover")
        return vertical_slash_attention_ranges(q, k, v, ranges, scale=scale, interpret=interpret)
    index = build_vertical_slash_index(vertical, slash, seq, block, block)
    return vertical_slash_tiles(q, k, v, index, scale=scale, interpret=interpret)
