"""Split-K decode attention (flash-decoding): one new query token per sequence over a long KV cache.

A decode step has one query row per head, so one program per (batch, KV head) would leave most of the GPU idle
on a long cache. The cache is instead split into `num_splits` key ranges; each (batch, KV head, split) program
attends the group's query heads over its range (GQA: the group's heads share one K/V read) and writes a
partial (unnormalised output, running max, running sum); a small XLA step merges the splits with
log-sum-exp weights. Keys at or past each sequence's length are masked, so ragged batches are exact; a
sequence of length 0 gives zeros. `decode_attention_reference` is the same math in plain XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lcjax.numerics import float32_precision, masked_softmax
from lcjax.pallas import _common
from lcjax.pallas import _triton_flash as _flash

DECODE_HEAD_DIMS = _common.SUPPORTED_HEAD_DIMS
MIN_ROWS = 16  # Triton's dot needs at least 16 rows: a GQA group of 4-8 query heads is zero-padded to 16


def _kernel(
    len_ref,
    first_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    acc_ref,
    m_ref,
    l_ref,
    *,
    block_k: int,
    split_len: int,
    qk_scale: float,
):
    split = pl.program_id(2)
    length = len_ref[0]
    layer = layer_ref[0]
    valid_from = first_ref[0]
    start = split * split_len
    stop = jnp.minimum(start + split_len, length)
    n_blocks = jax.lax.div(jnp.maximum(stop - start, 0) + block_k - 1, block_k)
    q = q_ref[...]
    lane = jnp.arange(block_k, dtype=jnp.int32)

    def body(i, state):
        first = start + i * block_k
        k, v = k_ref[layer, pl.ds(first, block_k), :], v_ref[layer, pl.ds(first, block_k), :]
        return _flash.update(
            state, q, k, v, qk_scale, (((first + lane) < stop) & ((first + lane) >= valid_from))[None, :]
        )

    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, _flash.init_state(q.shape[0], q.shape[1]))
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _splits(capacity: int, block_k: int, batch_kv_heads: int, num_splits: int | None) -> tuple[int, int]:
    """(num_splits, split_len): enough programs to fill an H100's 132 SMs about twice, splits of whole blocks."""
    if num_splits is None:
        num_splits = max(1, min(-(-capacity // block_k), -(-264 // batch_kv_heads)))
    split_len = -(-capacity // num_splits)
    split_len = -(-split_len // block_k) * block_k
    return -(-capacity // split_len), split_len


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    first: jax.Array | None = None,
    block_k: int = 64,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one new token per sequence over its cached keys.

    q: `[batch, heads, head_dim]`; k, v: `[batch, capacity, kv_heads, head_dim]` (a KVCache layer), or with
    `layer` (int32 scalar, may be traced) the whole stacked cache `[layers, batch, capacity, kv_heads,
    head_dim]`, read at that layer in place: slicing a layer out first would copy it every decode step.
    lengths: int32 `[batch]`, the valid slots of each sequence (keys at slots >= length are ignored); first:
    optional int32 `[batch]`, the first valid slot (keys before it are ignored: a compressed layer). Returns
    `[batch, heads, head_dim]` in q's dtype. num_splits: key ranges per (batch, KV head), default about two
    programs per SM; block_k, num_warps, num_stages tune speed only.
    """
    if layer is None:
        k, v, layer = k[None], v[None], 0
    if k.ndim != 5 or v.shape != k.shape:
        raise ValueError(
            f"decode_attention with `layer` takes stacked k, v [layers, batch, capacity, kv_heads, "
            f"head_dim]; got k {k.shape}, v {v.shape}."
        )
    _common.check_inputs("decode_attention", q[:, None], k[0], v[0])
    batch, heads, head_dim = q.shape
    capacity, kv_heads = k.shape[2], k.shape[3]
    group = heads // kv_heads
    rows = max(MIN_ROWS, 1 << (group - 1).bit_length())
    d_pad = _common.padded_head_dim(head_dim)
    n_splits, split_len = _splits(capacity, block_k, batch * kv_heads, num_splits)
    # the last split may be short: blocks start at multiples of block_k, so K/V only need padding (a copy)
    # when capacity is not a multiple of block_k (generate's caches are multiples of 256) or head_dim is 96
    padded = -(-capacity // block_k) * block_k
    qg = _common.pad_to(_common.pad_to(q.reshape(batch, kv_heads, group, head_dim), 2, rows), 3, d_pad)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    first = jnp.zeros((batch,), jnp.int32) if first is None else first
    if padded != capacity or d_pad != head_dim:  # padding copies: copy only the one layer
        k, v = (jax.lax.dynamic_index_in_dim(x, layer[0], 0) for x in (k, v))
        layer = jnp.zeros((1,), jnp.int32)
    k_p, v_p = (_common.pad_to(_common.pad_to(x, 2, padded), 4, d_pad) for x in (k, v))
    layers = k_p.shape[0]
    kernel = functools.partial(_kernel, block_k=block_k, split_len=split_len, qk_scale=scale * _common.LOG2E)
    out_specs, out_shape = split_partials(batch, kv_heads, n_splits, rows, d_pad)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, n_splits),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
            pl.BlockSpec((1,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, None, rows, d_pad), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((layers, None, padded, None, d_pad), lambda b, h, s: (0, b, 0, h, 0)),
            pl.BlockSpec((layers, None, padded, None, d_pad), lambda b, h, s: (0, b, 0, h, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 2),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32)[:, None], first.astype(jnp.int32)[:, None], layer, qg, k_p, v_p)
    return merge_splits(acc, m, l)[:, :, :group, :head_dim].reshape(batch, heads, head_dim).astype(q.dtype)


def split_partials(batch: int, kv_heads: int, n_splits: int, rows: int, width: int):
    """(out_specs, out_shape) of a split-K decode kernel over grid (batch, kv_heads, n_splits): per program an
    fp32 accumulator `[rows, width]` and running max and sum `[rows]` (the inputs of `merge_splits`)."""
    part = lambda *tail: pl.BlockSpec((None, None, None, *tail), lambda b, h, s: (b, h, s) + (0,) * len(tail))
    lead = (batch, kv_heads, n_splits, rows)
    return (
        [part(rows, width), part(rows), part(rows)],
        [
            jax.ShapeDtypeStruct(lead + (width,), jnp.float32),
            jax.ShapeDtypeStruct(lead, jnp.float32),
            jax.ShapeDtypeStruct(lead, jnp.float32),
        ],
    )


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Combines per-split partials (acc `[..., splits, rows, d]`, m and l `[..., splits, rows]`, base-2 logits)
    into normalised outputs `[..., rows, d]`; rows that met no key give zeros."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_all)  # an empty split has l = 0, so it weighs nothing
    total = jnp.sum(w * l, axis=-2)
    out = jnp.sum(w[..., None] * acc, axis=-3)
    return out / jnp.where(total == 0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("scale",))
def decode_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, scale: float, first: jax.Array | None = None
) -> jax.Array:
    """`decode_attention` in plain XLA (fp32 softmax over the valid slots; GQA by reshaping q). For float32 inputs
    its dots run at float32 precision (not TF32, XLA's default on the GPU); bf16/fp16 ones are upcast and keep
    XLA's default, as the benchmarks' XLA peer."""
    hp = float32_precision(q)
    batch, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k.astype(jnp.float32), precision=hp) * scale
    slot = jnp.arange(k.shape[1])[None, :]
    valid = (slot < lengths[:, None]) & (slot >= (0 if first is None else first[:, None]))
    p = masked_softmax(s, valid[:, None, None, :])
    out = jnp.einsum("bkgt,btkd->bkgd", p, v.astype(jnp.float32), precision=hp)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
