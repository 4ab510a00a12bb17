"""`KVCache`: the dense KV cache, one pytree holding every layer's keys and values.

`KVCache` stacks layers in its arrays so the model's `lax.scan` over layers can thread it as one value,
and writes with scatters that XLA performs in place when the cache is donated. A model with unstacked layer
weights (a Python loop over layers) keeps one array per layer instead (`k`, `v` tuples): XLA does not keep a
chain of writes into one stacked buffer in place across separately traced layers (it holds copies of the whole
cache during a long prefill), and per-layer buffers need no layer indexing at all. Slots are filled left to
right; `lengths` counts the filled slots of each sequence and `positions` is the RoPE position its next
token gets (the two differ once a compression method drops tokens). Names follow transformers'
`cache_utils` (`get_seq_length`, `crop`) so they are familiar.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lcjax.cache.layers import pad_slots, repeat_batch, scatter_layer
from lcjax.config import ModelConfig
from lcjax.numerics import attention_mask, xla_attention
from lcjax.pallas.decode_attention import DECODE_HEAD_DIMS, decode_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Dense KV cache.

    k, v: `[layers, batch, capacity, kv_heads, head_dim]`, or (per-layer layout) tuples of `layers` arrays
    `[batch, capacity, kv_heads, head_dim]`, indexed by a Python int layer; lengths, positions: int32 `[batch]`;
    first: int32 `[layers, batch]`, each layer's first valid slot (0 unless a compression kept fewer tokens in
    some layers than others: layers end at the same slot, `lengths`, and start at `first`).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths: jax.Array
    positions: jax.Array
    first: jax.Array

    @classmethod
    def init(
        cls,
        num_layers: int,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        stacked: bool = True,
    ) -> "KVCache":
        """An empty cache with room for `capacity` tokens per sequence (`stacked=False`: per-layer arrays)."""
        zeros = jnp.zeros((batch,), jnp.int32)
        first = jnp.zeros((num_layers, batch), jnp.int32)
        if stacked:
            shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
            return cls(
                k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=zeros, positions=zeros, first=first
            )
        shape = (batch, capacity, num_kv_heads, head_dim)
        per_layer = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(k=per_layer(), v=per_layer(), lengths=zeros, positions=zeros, first=first)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def capacity(self) -> int:
        return self.k.shape[2] if self.stacked else self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def slots_needed(self, new_tokens: int) -> int:
        """The capacity `new_tokens` more tokens in every sequence need: the longest sequence's slots plus them."""
        return int(jnp.max(self.lengths)) + new_tokens

    def get_seq_length(self) -> jax.Array:
        """Filled slots per sequence, int32 `[batch]`."""
        return self.lengths

    def update(
        self,
        layer: jax.Array | int,
        k_new: jax.Array,
        v_new: jax.Array,
        start: jax.Array,
        lengths: jax.Array | None = None,
    ) -> "KVCache":
        """Writes `k_new, v_new: [batch, seq, kv_heads, head_dim]` into `layer` at slots `start[b] + t`.

        lengths: int32 `[batch]`, the valid slots once written (rows past it are padding; caches that keep
        derived state, such as Quest's page bounds, skip them; this one writes them and masks them on read).
        Slots past capacity are dropped here (inside jit nothing can raise): `Transformer.extend` and
        `generate` check capacity first, and `generate` grows the cache (`with_capacity`) when needed.
        `lengths`/`positions` are not changed here; `advance` does that once for all layers.
        """
        batch, seq = k_new.shape[:2]
        index = (jnp.arange(batch)[:, None], start[:, None] + jnp.arange(seq)[None, :])
        return dataclasses.replace(
            self, k=scatter_layer(self.k, layer, index, k_new), v=scatter_layer(self.v, layer, index, v_new)
        )

    def layer_first(self, layer: jax.Array | int) -> jax.Array:
        """int32 `[batch]`: the first valid slot of `layer` in each sequence."""
        return self.first[layer]

    def attend_decode(
        self, q: jax.Array, layer: jax.Array | int, lengths: jax.Array, scale: float, implementation: str
    ) -> jax.Array:
        """One query per sequence, `q: [batch, heads, head_dim]`, over `layer` (its new key written; `lengths`
        counts it): the split-K Pallas kernel (`lcjax.pallas.decode_attention`) for "pallas", and for "auto" on
        a GPU where it supports the head dim; else XLA. Returns `[batch, heads, head_dim]`."""
        on_gpu = jax.default_backend() == "gpu"
        # whole 8B decode steps were faster through the kernel on the H100, from 1 x 4K up (BENCHMARKS.md)
        if implementation == "pallas" or (implementation == "auto" and on_gpu and q.shape[-1] in DECODE_HEAD_DIMS):
            # the stacked cache and the layer index: the kernel reads the layer in place, where slicing it out
            # would copy a layer per layer per step (a whole cache read and write per token)
            kv, index = ((self.k, self.v), layer) if self.stacked else (self.layer_kv(layer), None)
            return decode_attention(
                q, *kv, lengths, scale=scale, layer=index, first=self.layer_first(layer), interpret=not on_gpu
            )
        keys, values = self.layer_kv(layer)
        mask = attention_mask((lengths - 1)[:, None], self.capacity, lengths, None, self.layer_first(layer))
        return xla_attention(q[:, None], keys, values, mask, scale)[:, 0]

    def layer_kv(self, layer: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """Keys and values of one layer, each `[batch, capacity, kv_heads, head_dim]` (a Python int layer for
        the per-layer layout)."""
        return self.k[layer], self.v[layer]

    def rotate_keys(self, rotate: Callable[[jax.Array, jax.Array], jax.Array]) -> "KVCache":
        """Every layer's keys through `rotate(keys [batch, capacity, kv_heads, head_dim], positions [batch,
        capacity]) -> keys`, where a slot's position is its index: a LongRoPE model crossing its switch
        (`lcjax.positions.LongRope`) re-rotates its cached keys this way. Exact while every token is kept (a
        press that evicts leaves slots whose positions the cache no longer knows)."""
        batch, capacity = self.batch, self.capacity
        slots = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
        if self.stacked:
            return dataclasses.replace(self, k=jax.vmap(lambda k: rotate(k, slots))(self.k))
        return dataclasses.replace(self, k=tuple(rotate(k, slots) for k in self.k))

    def advance(self, num_new: jax.Array) -> "KVCache":
        """Marks `num_new: [batch]` more slots (and positions) as filled."""
        return dataclasses.replace(self, lengths=self.lengths + num_new, positions=self.positions + num_new)

    def fork(self, n: int) -> "KVCache":
        """Each sequence repeated n times (sequence b becomes rows b*n .. b*n + n - 1), for n requests that
        share one prefilled context. The prefix is copied: the new cache takes n times the memory of this one
        (a copy at memory bandwidth, ~3 ms per GiB on an H100), and the forks then diverge freely."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}.")
        kv = lambda x: repeat_batch(x, n)
        return dataclasses.replace(
            self,
            k=kv(self.k),
            v=kv(self.v),
            lengths=jnp.repeat(self.lengths, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            first=jnp.repeat(self.first, n, axis=1),
        )

    def with_capacity(self, capacity: int) -> "KVCache":
        """The same cache in `capacity` slots per sequence (a copy; growing pads with empty slots)."""
        if capacity < self.capacity:
            raise ValueError(
                f"with_capacity({capacity}) would cut a cache of capacity {self.capacity}; use crop() to forget tokens."
            )
        grow = lambda x: pad_slots(x, capacity - self.capacity)
        return dataclasses.replace(self, k=grow(self.k), v=grow(self.v))

    def with_slots_rebuilt(self) -> "KVCache":
        """The cache after its slots were rewritten wholesale (a press's gather): caches that keep state derived
        from the keys (Quest's page bounds) recompute it here; a plain cache has none."""
        return self

    def crop(self, max_length: int) -> "KVCache":
        """Forgets every slot at or past `max_length` (transformers' `DynamicCache.crop`)."""
        lengths = jnp.minimum(self.lengths, max_length)
        return dataclasses.replace(
            self,
            lengths=lengths,
            positions=self.positions - (self.lengths - lengths),
            first=jnp.minimum(self.first, lengths[None, :]),
        )


class DenseStorage:
    """Mixin for cache transforms that keep a plain `KVCache` (the presses)."""

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> KVCache:
        return KVCache.init(
            config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim, dtype, stacked=stacked
        )
