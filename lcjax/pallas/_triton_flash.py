"""Online-softmax pieces shared by lcjax's Triton-lowered Pallas attention kernels (used inside kernels), and
their launch helpers.

The state of one query tile is (acc fp32 `[rows, head_dim]`, m fp32 `[rows]`, l fp32 `[rows]`): the
unnormalised output, the running max of the base-2 logits (from `_common.M_FLOOR`) and the running sum of
exp2(logit - m); a row that never meets an allowed key ends with l = 0 and `finish` writes zeros for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lcjax.numerics import float32_precision
from lcjax.pallas._common import M_FLOOR

State = tuple[jax.Array, jax.Array, jax.Array]


def init_state(rows: int, head_dim: int) -> State:
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), M_FLOOR, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """`a @ b` (or `a @ b.T`) with fp32 accumulation; float32 operands keep float32 precision
    (`float32_precision`), as the CPU interpreter and a user who passed float32 expect."""
    return plgpu.dot(a, b, trans_b=trans_b, precision=float32_precision(a, b))


def update(
    state: State, q: jax.Array, k: jax.Array, v: jax.Array, qk_scale: float, mask: jax.Array | None = None
) -> State:
    """One tile: q `[rows, d]`, k and v `[cols, d]`, mask bool `[rows, cols]` (None: all allowed)."""
    acc, m, l = state
    s = dot(q, k, trans_b=True) * qk_scale
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l


def finish(state: State, dtype) -> jax.Array:
    acc, _, l = state
    return (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(dtype)


def launch_grid(heads: int, num_q_blocks: int, batch: int, heads_fastest: bool):
    """The grid, a BlockSpec maker taking index maps of (head, query block, batch), and the grid axis of the
    query block. Query blocks run last first: under a causal mask they hold the most tiles, so the long
    programs start early and the short ones fill the tail. heads_fastest: programs of all heads for one query
    block launch together (the 4-8 query heads of a GQA group then read one K/V head at the same time);
    otherwise all query blocks of one head launch together."""
    last = num_q_blocks - 1
    if heads_fastest:
        grid, ids, q_axis = (heads, num_q_blocks, batch), (lambda h, i, b: (h, last - i, b)), 1
    else:
        grid, ids, q_axis = (num_q_blocks, heads, batch), (lambda i, h, b: (h, last - i, b)), 0

    def spec(block_shape, index_map):
        return pl.BlockSpec(block_shape, lambda *g: index_map(*ids(*g)))

    return grid, spec, q_axis


def default_warps(block_k: int) -> int:
    """Measured on H100, head_dim 128 (docs/kernel-notes.md): 64-key tiles ran best on 4 warps (8 took 44-47 % longer
    at 64 and 128 query rows); 128 x 128 vertical-slash tiles on 8 (4 took twice as long)."""
    return 8 if block_k >= 128 else 4


def launch(
    kernel,
    *,
    grid,
    in_specs: list,
    args: list,
    out_spec,
    out_like: jax.Array,
    tile_k: int,
    num_warps: int | None,
    num_stages: int | None,
    interpret: bool,
    name: str,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """`pl.pallas_call` of a kernel writing one output shaped like `out_like` with `out_spec`.

    `out_init` (testing): a buffer aliased to the output, e.g. NaNs, to prove every element is written.
    """
    aliases = {}
    if out_init is not None:
        in_specs, args = [*in_specs, out_spec], [*args, out_init]
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or default_warps(tile_k), num_stages=num_stages or 2),
        interpret=interpret,
        name=name,
    )(*args)


def qkv_specs(spec, block_q: int, kv_len: int, head_dim: int, groups: int):
    """BlockSpecs of one query tile and of the whole K/V of its KV head (query head h reads kv head
    h // groups: GQA without repeating K/V), for a grid made by `launch_grid`."""
    q_spec = spec((None, block_q, None, head_dim), lambda h, i, b: (b, i, h, 0))
    kv_spec = spec((None, kv_len, None, head_dim), lambda h, i, b: (b, 0, h // groups, 0))
    return q_spec, kv_spec


def gather_columns(
    state: State, q: jax.Array, k_ref, v_ref, cols_ref, count, rows: jax.Array, block: int, qk_scale: float
) -> State:
    """Attends the first `count` key columns listed in `cols_ref`, gathered `block` at a time, causally
    (a column after the query row is masked). rows: int32 `[block]`, the tile's query positions."""
    lane = jnp.arange(block, dtype=jnp.int32)

    def chunk(n, state):
        first = pl.multiple_of(n * block, block)
        cols = cols_ref[pl.ds(first, block)]
        k, v = k_ref[cols, :], v_ref[cols, :]
        mask = ((first + lane) < count)[None, :] & (cols[None, :] <= rows[:, None])
        return update(state, q, k, v, qk_scale, mask)

    return jax.lax.fori_loop(0, jax.lax.div(count + block - 1, block), chunk, state)
