"""Attention transforms: one signature for every method, and lcjax's dense attention.

An attention transform is any callable

    attention(q, k, v, cache, meta) -> (out, cache)

q: `[batch, q_len, heads, head_dim]`, k and v: `[batch, q_len, kv_heads, head_dim]` (this call's new
tokens, already rotated), cache: the whole cache pytree (any `lcjax.cache.Cache`, or None when nothing is
cached, as in training), meta: `AttentionMeta` (layer index, positions, lengths, phase). It returns
`out: [batch, q_len, heads, head_dim]` and the cache with this layer's new keys written. Seeing the whole
cache and the layer index lets sparse-prefill methods (per-layer/per-head patterns) share this one signature;
the model never branches on the method. How a decode step reads the cache is the cache's own (`Cache`).

`DenseAttention` is exact attention: the XLA reference of `lcjax.numerics` (GQA without repeating K/V, fp32
softmax, queries in chunks to bound memory) and, on GPU, cuDNN through `jax.nn.dot_product_attention`; a
single-token decode step asks the cache to read itself (`Cache.attend_decode`), so a quantised or paged cache
brings its own decode kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import jax
import jax.numpy as jnp

from lcjax.cache import Cache
from lcjax.numerics import attention_mask, xla_attention

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
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Cache | None, meta: AttentionMeta
    ) -> tuple[jax.Array, Cache | None]: ...


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, sliding_window: int | None, scale: float
) -> jax.Array:
    """Causal prefill attention through cuDNN's fused kernel (GPU, bf16/fp16 only).

    Shapes as `xla_attention`; keys and queries start at slot 0 and rows are right-padded to `lengths`.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        key_value_seq_lengths=lengths,
        local_window_size=window,
        implementation="cudnn",
    )


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Exact attention; the default transform.

    implementation: "xla" (reference, any device and dtype), "cudnn" (GPU prefill, bf16/fp16), or "auto"
    (cuDNN for prefill on GPU in half precision, else XLA).
    decode: how one new token per sequence attends over the cache, passed to the cache's `attend_decode`:
    "pallas" (the cache's kernel; interpret mode off GPU), "xla", or "auto" (the kernel on GPU where it applies).
    Models with a sliding window, and multi-token extends, read `layer_kv` and run the XLA path.
    """

    implementation: Literal["auto", "xla", "cudnn"] = "auto"
    q_chunk: int = 1024
    decode: Literal["auto", "xla", "pallas"] = "auto"

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
            if q.shape[1] == 1 and meta.sliding_window is None:
                out = cache.attend_decode(q[:, 0], meta.layer, meta.lengths, meta.scale, self.decode)
                return out[:, None], cache
            keys, values = cache.layer_kv(meta.layer)
            q_slots = meta.start[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
        first = None if meta.phase == "prefill" else cache.layer_first(meta.layer)
        mask = attention_mask(q_slots, keys.shape[1], meta.lengths, meta.sliding_window, first)
        return xla_attention(q, keys, values, mask, meta.scale, self.q_chunk), cache
