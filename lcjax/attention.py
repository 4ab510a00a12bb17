"""Attention transforms: one signature for every method, and lcjax's dense attention.

An attention transform is any callable

    attention(q, k, v, cache, meta) -> (out, cache)

q: `[batch, q_len, heads, head_dim]`, k and v: `[batch, q_len, kv_heads, head_dim]` (this call's new
tokens, already rotated), cache: the whole `KVCache` pytree (or None when nothing is cached, as in
training), meta: `AttentionMeta` (layer index, positions, lengths, phase). It returns
`out: [batch, q_len, heads, head_dim]` and the cache with this layer's new keys written. Seeing the whole
cache and the layer index lets sparse-prefill methods (per-layer/per-head patterns) and KV-aware decode
methods (Quest, RetrievalAttention) share this one signature; the model never branches on the method.

`DenseAttention` is exact attention: a plain-XLA reference (GQA without repeating K/V, fp32 softmax,
queries processed in chunks to bound memory) and, on GPU, cuDNN through `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import jax
import jax.numpy as jnp

from lcjax.cache import KVCache

Phase = Literal["prefill", "extend"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """What an attention transform may need besides q, k, v and the cache.

    layer: int32 `[]`, the layer index (traced inside the layer scan; a Python int when layers are unstacked).
    q_positions: int32 `[batch, q_len]`, RoPE positions of the new tokens.
    start: int32 `[batch]`, the cache slot of each sequence's first new token (0 in prefill).
    lengths: int32 `[batch]`, valid tokens per sequence after this call counted from slot 0 (for prefill:
      the unpadded prompt lengths; rows are right-padded).
    phase: "prefill" (no earlier tokens: attend within this call) or "extend" (attend over the cache).
    sliding_window: keys further back than this many tokens (query included) are masked; None = off.
    scale: the softmax scale, usually head_dim ** -0.5.
    """

    layer: jax.Array
    q_positions: jax.Array
    start: jax.Array
    lengths: jax.Array
    phase: Phase = dataclasses.field(default="prefill", metadata=dict(static=True))
    sliding_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache | None,
                 meta: AttentionMeta) -> tuple[jax.Array, KVCache | None]: ...


def attention_mask(q_slots: jax.Array, kv_len: int, lengths: jax.Array,
                   sliding_window: int | None, first: jax.Array | None = None) -> jax.Array:
    """Boolean `[batch, q_len, kv_len]`: causal by slot, within `[first, lengths)`, inside the window.

    q_slots: int32 `[batch, q_len]`, the slot each query occupies; keys sit at slots 0..kv_len-1; first: int32
    `[batch]`, the first valid slot (a compressed layer's; None: 0).
    """
    kv_slots = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    q = q_slots[:, :, None]
    mask = (kv_slots <= q) & (kv_slots < lengths[:, None, None])
    if first is not None:
        mask &= kv_slots >= first[:, None, None]
    if sliding_window is not None:
        mask &= q - kv_slots < sliding_window
    return mask


def float32_precision(*arrays: jax.Array) -> jax.lax.Precision | None:
    """The dot precision for these operands: HIGHEST where any is float32, else None (the backend's default).
    On the GPU, XLA's and Triton's default for float32 dots is TF32 (~5e-4 relative error); bf16/fp16 operands
    are unaffected."""
    return jax.lax.Precision.HIGHEST if any(x.dtype == jnp.float32 for x in arrays) else None


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_fn, scale: float,
                     q_chunk: int = 1024) -> jax.Array:
    """Softmax attention in plain XLA under a mask computed chunk by chunk; the reference for every kernel.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`.
    mask_fn(rows) -> bool `[batch, 1 or heads, len(rows), kv_len]`, rows: int32 `[chunk]` query indices
    (0-based within q), so per-head sparse patterns never materialise a full `[q_len, kv_len]` mask.
    GQA groups queries per KV head instead of repeating K/V. Logits and softmax are fp32; rows with no
    allowed key return zeros. Queries run in chunks of `q_chunk`: memory is O(q_chunk * kv_len).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    precision = float32_precision(q)

    def block(q_blk, rows):
        qg = q_blk.reshape(batch, -1, kv_heads, groups, head_dim)
        logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32,
                            precision=precision) * scale
        m = mask_fn(rows)
        m = m.reshape(batch, -1, 1, *m.shape[2:]) if m.shape[1] == 1 else m.reshape(
            batch, kv_heads, groups, *m.shape[2:])
        logits = jnp.where(m, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        probs = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        denom = jnp.sum(probs, axis=-1, keepdims=True)
        probs = probs / jnp.where(denom == 0, 1.0, denom)
        out = jnp.einsum("bkgqt,btkd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                         precision=precision)
        return out.reshape(batch, -1, heads, head_dim).astype(q.dtype)

    if q_len <= q_chunk:
        return block(q, jnp.arange(q_len, dtype=jnp.int32))
    num_chunks = -(-q_len // q_chunk)
    pad = num_chunks * q_chunk - q_len
    q_c = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, num_chunks, q_chunk, heads, head_dim)
    rows = jnp.arange(num_chunks * q_chunk, dtype=jnp.int32).reshape(num_chunks, q_chunk)
    out = jax.lax.map(lambda xs: block(*xs), (q_c.swapaxes(0, 1), rows))
    return out.swapaxes(0, 1).reshape(batch, num_chunks * q_chunk, heads, head_dim)[:, :q_len]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  q_chunk: int = 1024) -> jax.Array:
    """`masked_attention` with a precomputed mask: bool `[batch, q_len, kv_len]` or `[batch, heads, q_len, kv_len]`.

    Shapes and numerics as `masked_attention`.
    """
    q_len = q.shape[1]
    full = mask[:, None] if mask.ndim == 3 else mask

    def mask_fn(rows):
        # rows past q_len (chunk padding) read a clamped row; their outputs are dropped
        return jnp.take(full, jnp.minimum(rows, q_len - 1), axis=2)

    return masked_attention(q, k, v, mask_fn, scale, q_chunk)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    sliding_window: int | None, scale: float) -> jax.Array:
    """Causal prefill attention through cuDNN's fused kernel (GPU, bf16/fp16 only).

    Shapes as `xla_attention`; keys and queries start at slot 0 and rows are right-padded to `lengths`.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths, local_window_size=window,
        implementation="cudnn")


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Exact attention; the default transform.

    implementation: "xla" (reference, any device and dtype), "cudnn" (GPU prefill, bf16/fp16), or "auto"
    (cuDNN for prefill on GPU in half precision, else XLA).
    decode: how one new token per sequence attends over the cache: "pallas" (the split-K kernel
    `lcjax.pallas.decode_attention`; interpret mode off GPU), "xla", or "auto" (pallas on GPU for the head
    dims it supports). Models with a sliding window, and multi-token extends, run the XLA path.
    """

    implementation: Literal["auto", "xla", "cudnn"] = "auto"
    q_chunk: int = 1024
    decode: Literal["auto", "xla", "pallas"] = "auto"

    def _use_decode_kernel(self, q: jax.Array, meta: AttentionMeta) -> bool:
        if meta.phase != "extend" or q.shape[1] != 1 or meta.sliding_window is not None or self.decode == "xla":
            return False
        if self.decode == "pallas":
            return True  # the kernel names what it does not support
        # H100, 8B-shaped model (BENCHMARKS.md): whole decode steps were faster through the kernel even at 1 x 4K
        # (6.53 vs 6.79 ms; 8 x 4K 7.91 vs 8.65), though one layer timed alone had favoured XLA there
        return jax.default_backend() == "gpu" and q.shape[-1] in (64, 96, 128)

    def _use_cudnn(self, q: jax.Array, meta: AttentionMeta) -> bool:
        if meta.phase != "prefill" or self.implementation == "xla":
            return False
        if self.implementation == "cudnn":
            return True
        return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)

    def __call__(self, q, k, v, cache, meta):
        if cache is not None:
            cache = cache.update(meta.layer, k, v, meta.start, meta.lengths)
        if self._use_cudnn(q, meta):
            return cudnn_attention(q, k, v, meta.lengths, meta.sliding_window, meta.scale), cache
        if meta.phase == "prefill":
            keys, values = k, v
            q_slots = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        else:
            if cache is None:
                raise ValueError("phase='extend' attends over a KV cache, but cache is None.")
            if q.shape[1] == 1 and meta.sliding_window is None and hasattr(cache, "attend_decode"):
                # caches that store K/V differently (KIVI) or choose what to read (Quest) read themselves
                return cache.attend_decode(q[:, 0], meta.layer, meta.lengths, meta.scale, self.decode)[:, None], cache
            if self._use_decode_kernel(q, meta):
                from lcjax.pallas.decode_attention import decode_attention
                # the stacked cache and the layer index: the kernel reads the layer in place (slicing it out
                # first copied one layer per layer per step, a whole cache read + write per token)
                kv, layer = ((cache.k, cache.v), meta.layer) if cache.stacked else (cache.layer_kv(meta.layer), None)
                out = decode_attention(q[:, 0], *kv, meta.lengths, scale=meta.scale, layer=layer,
                                       first=cache.layer_first(meta.layer), interpret=jax.default_backend() != "gpu")
                return out[:, None], cache
            keys, values = cache.layer_kv(meta.layer)
            q_slots = meta.start[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
        first = None if meta.phase == "prefill" else cache.layer_first(meta.layer)
        mask = attention_mask(q_slots, keys.shape[1], meta.lengths, meta.sliding_window, first)
        return xla_attention(q, keys, values, mask, meta.scale, self.q_chunk), cache
