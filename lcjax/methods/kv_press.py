"""KV-cache compression ("presses", after NVIDIA kvpress): what every method shares.

A press decides, at the end of every prefill or appended turn, which cached tokens each layer and KV head
keeps; decode steps then append to the compressed cache, and the next turn is compressed again, so the cache
stays bounded across turns. A press is a frozen, hashable value passed to the model
(`model.with_transforms(cache_transform=SnapKVPress(compression_ratio=0.5))`); it supplies

- `window_size`: how many of the turn's last queries it needs (0: none). The model records those queries,
  already rotated, for every layer while it runs the turn (an `lcjax.cache.Observation`), whatever the
  attention method (so MInference prefill + SnapKV compose);
- `scores(keys, valid, observation, layer, scale)`: float32 `[batch, kv_heads, capacity]` per slot, +inf for
  slots that must stay, -inf for empty slots; higher is kept first;
- `budgets(num_layers, n_valid)`: int32 `[layers, batch]` tokens to keep per layer (from the valid count), and
  `max_budget(num_layers, capacity)`: a static bound on them.

`compress(press, cache, observation, scale, new_capacity)` runs a press over a whole `KVCache`: per layer and
KV head it keeps the top-scoring slots, in their original order. `compression_ratio` means what it means in
kvpress: the fraction of tokens removed (0.5 keeps half). Layers that keep different counts (PyramidKV) are
right-aligned so every layer ends at the same slot: `KVCache.first[layer]` marks where each starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache import DenseStorage, KVCache, Observation
from lcjax.numerics import masked_softmax


class KVPress(Protocol):
    window_size: int

    def scores(
        self, keys: jax.Array, valid: jax.Array, observation: Observation | None, layer, scale: float
    ) -> jax.Array: ...

    def budgets(self, num_layers: int, n_valid: jax.Array, slots: int) -> jax.Array: ...

    def max_budget(self, num_layers: int, capacity: int) -> int: ...


def kept_count(n_valid: jax.Array, capacity: int | None, compression_ratio: float | None, slots: int) -> jax.Array:
    """Tokens to keep from `n_valid: int32 [batch]` (at most `slots`): `capacity` (SCBench's setting) or
    kvpress's `max(1, int(n * (1 - compression_ratio)))`, never more than there are."""
    if compression_ratio is not None:
        keep = jnp.asarray(ratio_kept(slots, compression_ratio))[jnp.clip(n_valid, 0, slots)]
    else:
        keep = jnp.full_like(n_valid, capacity)
    return jnp.minimum(keep, n_valid)


def ratio_kept(slots: int, compression_ratio: float) -> np.ndarray:
    """int32 `[slots + 1]`: kvpress's kept count for every length 0..slots, computed as kvpress computes it (a
    float64 product truncated, at least 1), so a traced length reads the same integer by lookup (float32 on the
    device would truncate 5 x 0.6 to 2)."""
    n = np.arange(slots + 1, dtype=np.float64)
    return np.maximum(1, (n * (1 - compression_ratio)).astype(np.int64)).astype(np.int32)


def static_kept(capacity_slots: int, capacity: int | None, compression_ratio: float | None) -> int:
    """A static upper bound of `kept_count` for a cache of `capacity_slots` slots."""
    if compression_ratio is not None:
        return min(capacity_slots, math.ceil(capacity_slots * (1.0 - compression_ratio)))
    return min(capacity_slots, capacity)


SCBENCH_CAPACITY = 4096  # tokens kept per layer in SCBench's released settings


class Press(DenseStorage):
    """Mixin for presses: a dense cache, compressed by `compress` after every turn (the cache-transform
    protocol of `lcjax.cache.CacheTransform`)."""

    def after_turn(self, cache: KVCache, observation: Observation | None, scale: float, new_capacity: int) -> KVCache:
        return compress(self, cache, observation, scale, new_capacity)


class UniformBudget(Press):
    """Budgets for presses that keep the same count in every layer: `capacity` or `compression_ratio` (mixed
    into frozen dataclasses that define those two fields)."""

    capacity: int | None
    compression_ratio: float | None

    def __post_init__(self):
        self._settle_budget(type(self).__name__)

    def _settle_budget(self, name: str) -> None:
        """For `__post_init__`: a ratio replaces the default capacity (4096, SCBench's); then exactly one of the
        two must remain, in range."""
        if self.compression_ratio is not None and self.capacity == SCBENCH_CAPACITY:
            object.__setattr__(self, "capacity", None)
        check_budget(name, self.capacity, self.compression_ratio)

    def budgets(self, num_layers: int, n_valid: jax.Array, slots: int) -> jax.Array:
        keep = kept_count(n_valid, self.capacity, self.compression_ratio, slots)
        return jnp.broadcast_to(keep, (num_layers,) + keep.shape)

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return static_kept(capacity, self.capacity, self.compression_ratio)


def check_budget(name: str, capacity: int | None, compression_ratio: float | None, floor: int = 1):
    """Exactly one of capacity / compression_ratio, each in range (a clear error otherwise)."""
    if (capacity is None) == (compression_ratio is None):
        raise ValueError(
            f"{name}: give exactly one of capacity (tokens kept, SCBench) or compression_ratio "
            f"(fraction removed, kvpress); got capacity={capacity}, "
            f"compression_ratio={compression_ratio}."
        )
    if compression_ratio is not None and not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"{name}: compression_ratio must be in [0, 1), got {compression_ratio}.")
    if capacity is not None and capacity < floor:
        raise ValueError(f"{name}: capacity must be >= {floor}, got {capacity}.")


def _keep_slots(scores: jax.Array, kept: jax.Array, k_static: int) -> jax.Array:
    """int32 `[batch, kv_heads, k_static]`: each row's `kept[b]` best slots in ascending slot order, then
    `capacity` (a sentinel) for the unused tail."""
    capacity = scores.shape[-1]
    top = jax.lax.top_k(scores, k_static)[1]
    rank = jnp.arange(k_static)[None, None, :]
    return jnp.sort(jnp.where(rank < kept[:, None, None], top, capacity), axis=-1)


def _gather_layer(x: jax.Array, slots: jax.Array, first: jax.Array, new_capacity: int) -> jax.Array:
    """x `[batch, capacity, kv_heads, d]` -> `[batch, new_capacity, kv_heads, d]` holding `slots[b, h, i]` at
    slot `first[b] + i` (other slots get slot 0's data: they are masked as empty)."""
    j = jnp.arange(new_capacity)[None, :] - first[:, None]  # [batch, new_capacity]
    src = jnp.take_along_axis(slots, jnp.clip(j, 0, slots.shape[-1] - 1)[:, None, :], axis=-1)
    src = jnp.where((j >= 0)[:, None, :] & (src < x.shape[1]), src, 0)  # [batch, kv_heads, new_cap]
    return jnp.take_along_axis(x, jnp.swapaxes(src, 1, 2)[..., None], axis=1)


def compress(
    press: KVPress, cache: KVCache, observation: Observation | None, scale: float, new_capacity: int
) -> KVCache:
    """The cache after `press`: every layer keeps its budget of top-scoring slots per KV head (in order),
    right-aligned to one shared length; `new_capacity` slots (static, >= the press's static bound).

    Positions are unchanged (new tokens keep their true RoPE positions); lengths become the kept count."""
    if not isinstance(cache, KVCache):
        raise ValueError(
            f"{type(press).__name__} evicts tokens from a dense KVCache, not a {type(cache).__name__}; "
            "a press cannot be combined with a transform that stores K/V otherwise, such as KIVI."
        )
    num_layers = len(cache.k) if not cache.stacked else cache.k.shape[0]
    capacity = cache.capacity
    k_static = min(capacity, press.max_budget(num_layers, capacity))
    if new_capacity < k_static:
        raise ValueError(f"compress: new_capacity {new_capacity} < the press's bound {k_static}.")
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    budgets = press.budgets(num_layers, cache.lengths - jnp.min(cache.first, axis=0), cache.capacity)  # [layers, b]

    def layer_slots(keys, first, budget, layer):
        valid = (slot >= first[:, None]) & (slot < cache.lengths[:, None])  # [batch, capacity]
        scores = press.scores(keys, valid, observation, layer, scale)
        scores = jnp.where(valid[:, None, :], scores, -jnp.inf)
        kept = jnp.minimum(budget, cache.lengths - first)
        return _keep_slots(scores, kept, k_static), kept

    if cache.stacked:
        slots, kept = jax.lax.map(lambda xs: layer_slots(*xs), (cache.k, cache.first, budgets, jnp.arange(num_layers)))
    else:
        outs = [layer_slots(cache.k[l], cache.first[l], budgets[l], l) for l in range(num_layers)]
        slots, kept = jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])
    lengths = jnp.max(kept, axis=0)  # [batch]
    first = lengths[None, :] - kept  # [layers, batch]
    if cache.stacked:
        gather = jax.vmap(lambda x, s, f: _gather_layer(x, s, f, new_capacity))
        k, v = gather(cache.k, slots, first), gather(cache.v, slots, first)
    else:
        k = tuple(_gather_layer(cache.k[l], slots[l], first[l], new_capacity) for l in range(num_layers))
        v = tuple(_gather_layer(cache.v[l], slots[l], first[l], new_capacity) for l in range(num_layers))
    return dataclasses.replace(cache, k=k, v=v, lengths=lengths, first=first).with_slots_rebuilt()


def pool_scores(scores: jax.Array, kernel_size: int) -> jax.Array:
    """Average pooling along slots (`[..., capacity]`, stride 1, zero padding counted, as torch's avg_pool1d
    with padding kernel_size // 2): a kept token brings its neighbours' evidence with it."""
    if kernel_size <= 1:
        return scores
    pad = kernel_size // 2
    padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, kernel_size - 1 - pad)])
    return (
        jax.lax.reduce_window(
            padded, 0.0, jax.lax.add, (1,) * (scores.ndim - 1) + (kernel_size,), (1,) * scores.ndim, "VALID"
        )
        / kernel_size
    )


def window_attention_scores(
    keys: jax.Array, valid: jax.Array, observation: Observation, layer, scale: float
) -> jax.Array:
    """SnapKV's evidence: the softmax attention of the observation window's queries over the cached keys
    (causal by slot), averaged over the window's valid queries and the KV head's query group.

    keys `[batch, capacity, kv_heads, d]`; valid bool `[batch, capacity]`; returns float32 `[batch, kv_heads,
    capacity]`."""
    q = observation.q[layer]  # [batch, w, heads, d]
    batch, window, heads, d = q.shape
    kv_heads = keys.shape[2]
    qg = q.reshape(batch, window, kv_heads, heads // kv_heads, d)
    logits = jnp.einsum("bwkgd,btkd->bkgwt", qg, keys, preferred_element_type=jnp.float32) * scale
    slot = jnp.arange(keys.shape[1], dtype=jnp.int32)
    allowed = valid[:, None, :] & (slot[None, None, :] <= observation.slots[:, :, None])  # [batch, w, capacity]
    allowed &= observation.valid[:, :, None]
    probs = masked_softmax(logits, allowed[:, None, None])
    n_obs = jnp.maximum(jnp.sum(observation.valid, axis=1), 1).astype(jnp.float32)  # [batch]
    return jnp.sum(probs, axis=(2, 3)) / (n_obs[:, None, None] * (heads // kv_heads))


def newest(valid: jax.Array, n: int) -> jax.Array:
    """bool `[batch, capacity]`: the last `n` valid slots of each row (valid slots are contiguous)."""
    slot = jnp.arange(valid.shape[1], dtype=jnp.int32)[None, :]
    end = jnp.max(jnp.where(valid, slot + 1, 0), axis=1, keepdims=True)
    return valid & (slot >= end - n)


def oldest(valid: jax.Array, n: int) -> jax.Array:
    """bool `[batch, capacity]`: the first `n` valid slots of each row."""
    slot = jnp.arange(valid.shape[1], dtype=jnp.int32)[None, :]
    begin = jnp.min(jnp.where(valid, slot, valid.shape[1]), axis=1, keepdims=True)
    return valid & (slot < begin + n)
