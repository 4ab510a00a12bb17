"""What the model, the decode loop and the jobs may call on a KV cache and on a cache transform.

A **cache** (`Cache`) is one pytree holding every layer's keys and values plus whatever its storage needs
(quantisation scales, page bounds, an index): `KVCache` stores K/V densely, `KIVICache` in 2 or 4 bits,
`QuestCache` adds page bounds, `RetrievalCache` keeps a window and the rest in host memory. The model writes each
turn's K/V into it, reads it for multi-token turns, and asks it to attend for single-token decode steps, so a
cache that stores K/V differently, or chooses what to read, brings its own decode kernel. Slots fill left to
right: `lengths` counts the filled slots of each sequence, `positions` is the RoPE position its next token gets
(the two differ once a compression drops tokens), and each layer's valid slots are `[first[layer], lengths)`.

A **cache transform** (`CacheTransform`, the model's `cache_transform=`) decides which cache a model keeps and
what happens to it at the end of every prefill or appended turn (SCBench's compression stage): a press evicts
tokens, Quest rebuilds its page bounds. When it needs the turn's last queries (`window_size > 0`), the model
records them for every layer, whatever the attention method, and hands them over as an `Observation`.

Per-layer state is either stacked `[layers, batch, ...]` (a traced layer index inside the layer scan) or a
tuple of per-layer `[batch, ...]` arrays (a Python int layer); `lcjax.cache.layers` serves both.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Self, runtime_checkable

import jax
import jax.numpy as jnp

from lcjax.config import ModelConfig

Layer = jax.Array | int


@runtime_checkable
class Cache(Protocol):
    """A KV cache: the model and the decode loop call only these.

    lengths, positions: int32 `[batch]`; first: int32 `[layers, batch]`."""

    lengths: jax.Array
    positions: jax.Array
    first: jax.Array

    @property
    def batch(self) -> int: ...

    @property
    def capacity(self) -> int:
        """Slots per sequence."""

    def slots_needed(self, new_tokens: int) -> int:
        """The `capacity` that `new_tokens` more tokens in every sequence need (checked on the host before a turn:
        `with_capacity` grows a cache whose capacity is smaller)."""

    @property
    def stacked(self) -> bool:
        """Whether per-layer state is stacked (a layer scan) or one array per layer (a Python loop)."""

    def update(
        self, layer: Layer, k_new: jax.Array, v_new: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> Self:
        """Writes `k_new, v_new: [batch, seq, kv_heads, head_dim]` into `layer` at slots `start[b] + t`; `lengths`:
        int32 `[batch]`, the valid slots once written (rows past it are padding). `lengths`/`positions` are
        not changed here: `advance` does that once for all layers."""

    def layer_kv(self, layer: Layer) -> tuple[jax.Array, jax.Array]:
        """Keys and values of one layer in the model's dtype, each `[batch, capacity, kv_heads, head_dim]`
        (multi-token turns read this)."""

    def layer_first(self, layer: Layer) -> jax.Array:
        """int32 `[batch]`: the first valid slot of `layer`."""

    def attend_decode(
        self, q: jax.Array, layer: Layer, lengths: jax.Array, scale: float, implementation: str
    ) -> jax.Array:
        """One decode step's attention: `q: [batch, heads, head_dim]` over `layer` (the step's key already
        written; `lengths: [batch]` counts it). implementation: "auto", "pallas" or "xla". Returns
        `[batch, heads, head_dim]`."""

    def advance(self, num_new: jax.Array) -> Self:
        """Marks `num_new: [batch]` more slots (and positions) as filled."""

    def fork(self, n: int) -> Self:
        """Each sequence repeated n times (sequence b becomes rows b*n .. b*n + n - 1)."""

    def crop(self, max_length: int) -> Self:
        """Forgets every slot at or past `max_length`."""

    def with_capacity(self, capacity: int) -> Self:
        """The same cache in `capacity` slots per sequence (a copy; growing only)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """The last queries of a turn, per layer, for a cache transform that scores tokens by them.

    q: `[layers, batch, window, heads, head_dim]` (rotated); slots: int32 `[batch, window]`, the cache slot of
    each query; valid: bool `[batch, window]` (False where the turn had fewer than `window` tokens).
    """

    q: jax.Array
    slots: jax.Array
    valid: jax.Array


def observe_rows(start: jax.Array, lengths: jax.Array, window: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows (within this call), cache slots and validity of the last `window` new tokens of each sequence.

    start: int32 `[batch]`, the slot of the first new token; lengths: int32 `[batch]`, valid slots after the
    call. Returns rows, slots int32 `[batch, window]` and valid bool `[batch, window]`."""
    new = lengths - start
    rows = new[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]
    return jnp.maximum(rows, 0), start[:, None] + rows, rows >= 0


def empty_observation(
    num_layers: int, batch: int, window: int, num_heads: int, head_dim: int, dtype, start: jax.Array, lengths: jax.Array
) -> Observation:
    """An `Observation` with zero queries, its slots and validity set for a call over `[start, lengths)`."""
    _, slots, valid = observe_rows(start, lengths, window)
    return Observation(jnp.zeros((num_layers, batch, window, num_heads, head_dim), dtype), slots, valid)


@runtime_checkable
class CacheTransform(Protocol):
    """What a value in the model's `cache_transform=` slot supplies.

    window_size: how many of a turn's last queries `after_turn` needs (0: none).
    """

    window_size: int

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> Cache:
        """The empty cache this transform keeps."""

    def max_budget(self, num_layers: int, capacity: int) -> int:
        """A static bound on the slots the cache keeps after a turn (the prefill allocates that much plus the
        room asked for after the prompt)."""

    def after_turn(self, cache: Cache, observation: Observation | None, scale: float, new_capacity: int) -> Cache:
        """The cache once the turn is done (a press compresses it; Quest rebuilds its page bounds)."""


_TRANSFORM_METHODS = ("window_size", "init_cache", "max_budget", "after_turn")


@dataclasses.dataclass(frozen=True)
class Chain:
    """Several cache transforms applied in order after every turn, e.g. `Chain((SnapKVPress(), Quest()))`:
    SnapKV compresses, then Quest rebuilds its page bounds over the kept tokens and selects pages at decode.
    The last transform makes the cache; at most one may need queries (`window_size`)."""

    transforms: tuple[CacheTransform, ...]

    def __post_init__(self):
        if len(self.transforms) < 1:
            raise ValueError("Chain needs at least one cache transform.")
        windows = [t for t in self.transforms if t.window_size]
        if len(windows) > 1:
            raise ValueError(f"Chain: at most one transform may observe queries; {windows} all do.")

    @property
    def window_size(self) -> int:
        return max(t.window_size for t in self.transforms)

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> Cache:
        return self.transforms[-1].init_cache(config, batch, capacity, dtype, stacked)

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return min(t.max_budget(num_layers, capacity) for t in self.transforms)

    def after_turn(self, cache: Cache, observation: Observation | None, scale: float, new_capacity: int) -> Cache:
        for t in self.transforms:
            cache = t.after_turn(cache, observation, scale, new_capacity)
        return cache


def as_cache_transform(value) -> CacheTransform | None:
    """A model's `cache_transform=` argument: a transform, a tuple/list of them (a `Chain`), or None / "dense"."""
    if value is None or (isinstance(value, str) and value == "dense"):
        return None
    if isinstance(value, (tuple, list)):
        value = tuple(as_cache_transform(t) for t in value)
        value = tuple(t for t in value if t is not None)
        return None if not value else value[0] if len(value) == 1 else Chain(value)
    if not isinstance(value, CacheTransform):
        missing = [name for name in _TRANSFORM_METHODS if not hasattr(value, name)]
        raise TypeError(
            f"{value!r} is not a cache transform (it lacks {', '.join(missing)}); use one from "
            "lcjax.methods, e.g. SnapKVPress(), KIVI(), Quest()."
        )
    return value


def cache_nbytes(cache) -> int:
    """Bytes the cache pytree's arrays occupy (its real device footprint)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
