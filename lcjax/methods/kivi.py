"""KIVI (Liu et al. 2024) as a cache transform: a 2-bit KV cache with a full-precision residual.

`KIVICache` stores each layer's older tokens quantised (keys per channel over groups of `group_size` tokens,
values per token over groups of `group_size` channels; codes packed four to a byte, fp16 scales and zeros:
0.19x the bytes of bf16 at 2 bits and groups of 32) and the newest tokens, fewer than `residual_length`, in
the model's dtype. A write appends to the residual; whenever it fills, whole residual blocks are quantised
into the packed storage. So the memory saving is real: nothing else holds the tokens. Decode steps read the
packed codes in a Pallas kernel that dequantises in registers (`lcjax.pallas.kivi_decode_attention`); prefill
attends over the prompt's own full-precision K/V, as KIVI does, and a later multi-token turn reads the
cache dequantised.

SCBench's settings (its `KiviCache`): 2 bits, groups of 32, a residual of 32 tokens. One simplification: KIVI
keeps exactly the last `residual_length` values in full precision and quantises values one token at a time;
here keys and values are quantised together in residual-sized blocks, so between 0 and `residual_length - 1`
of the newest tokens are full precision, for both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.cache.layers import layered, pad_slots, repeat_batch, scatter_layer, set_layer
from lcjax.config import ModelConfig
from lcjax.pallas import kivi_decode_attention as kernel
from lcjax.pallas.kivi_quant import CHANNEL, TOKEN, QuantizedTensor, dequantize, quantize_keys, quantize_values

_QUANTISED = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")  # KIVICache's per-layer codes
_RESIDUAL = ("k_res", "v_res")  # and full-precision rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVICache:
    """A quantised KV cache. Per layer (stacked `[layers, ...]` or tuples of per-layer arrays, as `KVCache`):

    k_codes, v_codes: uint8 `[batch, capacity, kv_heads, head_dim * bits / 8]` (planar packing, `pack_codes`);
    k_scale, k_zero: fp16 `[batch, capacity / group, kv_heads, head_dim]` (keys: per channel, per token group);
    v_scale, v_zero: fp16 `[batch, capacity, kv_heads, head_dim / group]` (values: per token, per channel group);
    k_res, v_res: `[batch, residual, kv_heads, head_dim]` in the model dtype, slots `quantized .. quantized + r`;
    quantized: int32 `[layers, batch]`, slots `[0, quantized)` live in the codes (a multiple of `residual`;
    per layer because a forward pass updates one layer at a time).
    lengths, positions: int32 `[batch]`; first: int32 `[layers, batch]` (always 0: KIVI evicts nothing).
    """

    k_codes: jax.Array | tuple
    k_scale: jax.Array | tuple
    k_zero: jax.Array | tuple
    v_codes: jax.Array | tuple
    v_scale: jax.Array | tuple
    v_zero: jax.Array | tuple
    k_res: jax.Array | tuple
    v_res: jax.Array | tuple
    quantized: jax.Array
    lengths: jax.Array
    positions: jax.Array
    first: jax.Array
    bits: int = dataclasses.field(default=2, metadata=dict(static=True))
    group: int = dataclasses.field(default=32, metadata=dict(static=True))
    residual: int = dataclasses.field(default=32, metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        num_layers: int,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        stacked: bool = True,
        bits: int = 2,
        group: int = 32,
        residual: int = 32,
    ) -> "KIVICache":
        """An empty cache with room for `capacity` tokens (rounded up to a multiple of `group`)."""
        per_byte = 8 // bits
        if residual % group or head_dim % group or head_dim % per_byte:
            raise ValueError(
                f"KIVI: residual_length ({residual}) and head_dim ({head_dim}) must be multiples of "
                f"group_size ({group}), and head_dim of {per_byte}."
            )
        capacity = -(-capacity // group) * group
        per_layer = lambda shape, dt: layered(num_layers, shape, dt, stacked)
        codes = (batch, capacity, kv_heads, head_dim // per_byte)
        k_groups = (batch, capacity // group, kv_heads, head_dim)
        v_groups = (batch, capacity, kv_heads, head_dim // group)
        res = (batch, residual, kv_heads, head_dim)
        zeros = jnp.zeros((batch,), jnp.int32)
        return cls(
            per_layer(codes, jnp.uint8),
            per_layer(k_groups, jnp.float16),
            per_layer(k_groups, jnp.float16),
            per_layer(codes, jnp.uint8),
            per_layer(v_groups, jnp.float16),
            per_layer(v_groups, jnp.float16),
            per_layer(res, dtype),
            per_layer(res, dtype),
            jnp.zeros((num_layers, batch), jnp.int32),
            zeros,
            zeros,
            jnp.zeros((num_layers, batch), jnp.int32),
            bits,
            group,
            residual,
        )

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k_codes, tuple)

    @property
    def capacity(self) -> int:
        return self.k_codes[0].shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def slots_needed(self, new_tokens: int) -> int:
        return int(jnp.max(self.lengths)) + new_tokens

    @property
    def dtype(self):
        return self.k_res[0].dtype

    def get_seq_length(self) -> jax.Array:
        return self.lengths

    def layer_first(self, layer) -> jax.Array:
        return self.first[layer]

    def _quantized(self, layer) -> tuple[QuantizedTensor, QuantizedTensor]:
        batch, capacity, kv_heads = self.k_codes[layer].shape[:3]
        shape = (batch, capacity, kv_heads, self.k_res[layer].shape[-1])
        dtype = jnp.dtype(self.dtype).name
        keys = QuantizedTensor(
            self.k_codes[layer], self.k_scale[layer], self.k_zero[layer], self.bits, self.group, TOKEN, shape, dtype
        )
        values = QuantizedTensor(
            self.v_codes[layer], self.v_scale[layer], self.v_zero[layer], self.bits, self.group, CHANNEL, shape, dtype
        )
        return keys, values

    def layer_kv(self, layer) -> tuple[jax.Array, jax.Array]:
        """Keys and values of one layer, `[batch, capacity, kv_heads, head_dim]`: the codes dequantised, the
        residual at its slots (a full-size temporary: multi-token turns only; decode reads the codes)."""
        keys, values = self._quantized(layer)
        index = (jnp.arange(self.batch)[:, None], self.quantized[layer][:, None] + jnp.arange(self.residual)[None, :])
        overlay = lambda full, res: full.at[index].set(res, mode="drop")
        return (overlay(dequantize(keys), self.k_res[layer]), overlay(dequantize(values), self.v_res[layer]))

    def update(
        self, layer, k_new: jax.Array, v_new: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> "KIVICache":
        """Appends `k_new, v_new: [batch, seq, kv_heads, head_dim]` at slots `start[b] + t` (start = the cached
        length: KIVI only appends); `lengths` (default start + seq) counts the valid slots afterwards. The residual
        and the new tokens are quantised in whole residual blocks up to `lengths`; the rest becomes the residual."""
        batch, seq = k_new.shape[:2]
        R, G = self.residual, self.group
        lengths = start + seq if lengths is None else lengths
        done = self.quantized[layer]  # [batch]
        now = done + (jnp.maximum(lengths - done, 0) // R) * R  # quantised once written
        shift = now - done
        rows = jnp.arange(batch)[:, None]
        layer_state = tuple(getattr(self, name)[layer] for name in _QUANTISED)
        if seq == 1:
            # a decode step: the token goes into its residual row (start - done < R: the residual never fills up
            # before it is flushed); once every R steps the full residual becomes one block of codes and the
            # residual starts over (its rows are then stale, and past every valid count)
            slot = (rows, (start - done)[:, None])
            residual = dict(
                k_res=scatter_layer(self.k_res, layer, slot, k_new), v_res=scatter_layer(self.v_res, layer, slot, v_new)
            )
            layer_state = jax.lax.cond(
                jnp.any(shift > 0),
                lambda s: self._write_blocks(s, residual["k_res"][layer], residual["v_res"][layer], done, shift),
                lambda s: s,
                layer_state,
            )
        else:
            pending_len = -(-(R + seq) // G) * G

            def pending(res, new):  # residual then new tokens, [b, P, ...]
                buf = jnp.zeros((batch, pending_len) + new.shape[2:], res.dtype).at[:, :R].set(res)
                return buf.at[rows, (start - done)[:, None] + jnp.arange(seq)[None, :]].set(
                    new.astype(res.dtype), mode="drop"
                )

            pk, pv = pending(self.k_res[layer], k_new), pending(self.v_res[layer], v_new)
            take = jnp.minimum(shift[:, None] + jnp.arange(R)[None, :], pending_len - 1)[:, :, None, None]
            residual = {
                name: set_layer(getattr(self, name), layer, jnp.take_along_axis(p, take, axis=1))
                for name, p in (("k_res", pk), ("v_res", pv))
            }
            layer_state = self._write_blocks(layer_state, pk, pv, done, shift)
        codes = {name: set_layer(getattr(self, name), layer, x) for name, x in zip(_QUANTISED, layer_state)}
        return dataclasses.replace(self, **residual, **codes, quantized=self.quantized.at[layer].set(now))

    def _write_blocks(
        self, layer_state: tuple, keys: jax.Array, values: jax.Array, done: jax.Array, shift: jax.Array
    ) -> tuple:
        """One layer's codes (`_QUANTISED` order) with `keys, values: [batch, P, kv_heads, head_dim]` (P a multiple
        of the group) quantised and their first `shift[b]` rows (whole groups) written at slots `done[b]...`."""
        G = self.group
        batch, P = keys.shape[:2]
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = layer_state
        qk, qv = quantize_keys(keys, G, self.bits), quantize_values(values, G, self.bits)
        rows = jnp.arange(batch)[:, None]
        j = jnp.arange(P)[None, :]
        dst = (rows, jnp.where(j < shift[:, None], done[:, None] + j, self.capacity))  # beyond: dropped
        g = jnp.arange(P // G)[None, :]
        gdst = (rows, jnp.where(g * G < shift[:, None], (done // G)[:, None] + g, self.capacity // G))
        put = lambda x, index, new: x.at[index].set(new.astype(x.dtype), mode="drop")
        return (
            put(k_codes, dst, qk.packed),
            put(k_scale, gdst, qk.scale),
            put(k_zero, gdst, qk.zero),
            put(v_codes, dst, qv.packed),
            put(v_scale, dst, qv.scale),
            put(v_zero, dst, qv.zero),
        )

    def attend_decode(self, q: jax.Array, layer, lengths: jax.Array, scale: float, implementation: str) -> jax.Array:
        """One query per sequence, `q: [batch, heads, head_dim]`, over `layer` (its new token written; `lengths`
        counts it): the Pallas kernel on GPU (dequantising in registers), else the XLA reference."""
        done = self.quantized[layer]
        args = (
            q,
            self.k_codes[layer],
            self.k_scale[layer],
            self.k_zero[layer],
            self.v_codes[layer],
            self.v_scale[layer],
            self.v_zero[layer],
            done,
            self.k_res[layer],
            self.v_res[layer],
            jnp.maximum(lengths - done, 0),
        )
        kw = dict(scale=scale, bits=self.bits, key_group=self.group, value_group=self.group, first=self.first[layer])
        on_gpu = jax.default_backend() == "gpu"
        supported = kernel.kivi_kernel_supported(q.shape[-1], self.bits, self.group, self.group)
        if implementation == "pallas" or (implementation == "auto" and on_gpu and supported):
            return kernel.kivi_decode_attention(*args, **kw, interpret=not on_gpu)
        return kernel.kivi_decode_attention_reference(*args, **kw)

    def advance(self, num_new: jax.Array) -> "KIVICache":
        return dataclasses.replace(self, lengths=self.lengths + num_new, positions=self.positions + num_new)

    def fork(self, n: int) -> "KIVICache":
        """Each sequence repeated n times (rows b*n .. b*n + n - 1); the quantised prefix is copied."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}.")
        state = {name: repeat_batch(getattr(self, name), n) for name in _QUANTISED + _RESIDUAL}
        return dataclasses.replace(
            self,
            **state,
            quantized=jnp.repeat(self.quantized, n, axis=1),
            lengths=jnp.repeat(self.lengths, n),
            positions=jnp.repeat(self.positions, n),
            first=jnp.repeat(self.first, n, axis=1),
        )

    def with_capacity(self, capacity: int) -> "KIVICache":
        """The same cache with room for `capacity` tokens (rounded up to a multiple of the group; a copy)."""
        capacity = -(-capacity // self.group) * self.group
        if capacity < self.capacity:
            raise ValueError(
                f"with_capacity({capacity}) would cut a cache of capacity {self.capacity}; use crop() to forget tokens."
            )
        extra = capacity - self.capacity
        grow = {name: pad_slots(getattr(self, name), extra) for name in ("k_codes", "v_codes", "v_scale", "v_zero")}
        grow.update({name: pad_slots(getattr(self, name), extra // self.group) for name in ("k_scale", "k_zero")})
        return dataclasses.replace(self, **grow)

    def crop(self, max_length: int) -> "KIVICache":
        """Forgets every slot at or past `max_length`. Quantised blocks that now end past the length return to the
        residual, dequantised (they stay as lossy as they were)."""
        lengths = jnp.minimum(self.lengths, max_length)
        keep = jnp.minimum(self.quantized, ((lengths // self.residual) * self.residual)[None, :])
        num_layers = self.quantized.shape[0]
        k_res, v_res = self.k_res, self.v_res
        for layer in range(num_layers):
            k, v = self.layer_kv(layer)
            take = (keep[layer][:, None] + jnp.arange(self.residual)[None, :])[:, :, None, None]
            take = jnp.minimum(take, self.capacity - 1)
            k_res = set_layer(k_res, layer, jnp.take_along_axis(k, take, axis=1))
            v_res = set_layer(v_res, layer, jnp.take_along_axis(v, take, axis=1))
        return dataclasses.replace(
            self,
            k_res=k_res,
            v_res=v_res,
            quantized=keep,
            lengths=lengths,
            positions=self.positions - (self.lengths - lengths),
        )


@dataclasses.dataclass(frozen=True)
class KIVI:
    """KIVI quantisation of the whole cache: `bits` (2 or 4), `group_size` tokens (keys) / channels (values)
    per scale, `residual_length` newest tokens kept in full precision (SCBench's names and defaults)."""

    bits: int = 2
    group_size: int = 32
    residual_length: int = 32
    window_size: int = dataclasses.field(default=0, init=False)  # needs no queries

    def __post_init__(self):
        if self.bits not in (2, 4):
            raise ValueError(f"KIVI: bits must be 2 or 4, got {self.bits}.")
        if self.group_size < 1 or self.residual_length < self.group_size or self.residual_length % self.group_size:
            raise ValueError(
                f"KIVI: residual_length ({self.residual_length}) must be a positive multiple of "
                f"group_size ({self.group_size})."
            )

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> KIVICache:
        return KIVICache.init(
            config.num_layers,
            batch,
            capacity,
            config.num_kv_heads,
            config.head_dim,
            dtype,
            stacked,
            self.bits,
            self.group_size,
            self.residual_length,
        )

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return capacity

    def after_turn(self, cache, observation, scale: float, new_capacity: int) -> KIVICache:
        if not isinstance(cache, KIVICache):
            raise ValueError(
                f"KIVI quantises the cache it makes (KIVICache), got a {type(cache).__name__}: put KIVI() last among "
                "the cache transforms (a press cannot be combined with KIVI: it evicts from dense K/V)."
            )
        return cache  # quantisation happens as tokens are written
