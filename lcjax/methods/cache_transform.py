"""Cache transforms: what a value in the model's `cache=` slot supplies, and `Chain` to compose several.

A cache transform decides how K/V are stored and what happens to them at the end of every prefill or appended
turn (SCBench's compression stage); the cache class it makes decides how a decode step reads them (the
loading stage). The model calls, through this protocol only:

- `init_cache(config, batch, capacity, dtype, stacked)`: the empty cache pytree (a dense `KVCache`, KIVI's
  quantised cache, Quest's cache with page bounds);
- `window_size`: how many of a turn's last queries `after_turn` needs (0: none);
- `max_budget(num_layers, capacity)`: a static bound on the slots the cache keeps after a turn (the prefill
  allocates that much plus the room asked for after the prompt);
- `after_turn(cache, observation, scale, new_capacity)`: the cache once the turn is done (a press compresses
  it; Quest rebuilds its page bounds over what is left).

A cache class may also define `attend_decode(q, layer, lengths, scale, implementation)`; dense attention calls
it for single-token decode steps instead of reading `layer_kv`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax

from lcjax.cache import KVCache
from lcjax.config import ModelConfig


class CacheTransform(Protocol):
    window_size: int

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool): ...

    def max_budget(self, num_layers: int, capacity: int) -> int: ...

    def after_turn(self, cache, observation, scale: float, new_capacity: int): ...


class DenseStorage:
    """Mixin: the transform keeps a plain `KVCache` (the presses)."""

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> KVCache:
        return KVCache.init(config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim, dtype,
                            stacked=stacked)


@dataclasses.dataclass(frozen=True)
class Chain:
    """Several cache transforms applied in order after every turn, e.g. `Chain((snapkv(), quest()))`: SnapKV
    compresses, then Quest rebuilds its page bounds over the kept tokens and selects pages at decode. The last
    transform makes the cache; at most one may need queries (`window_size`)."""

    transforms: tuple

    def __post_init__(self):
        if len(self.transforms) < 1:
            raise ValueError("Chain needs at least one cache transform.")
        windows = [t for t in self.transforms if t.window_size]
        if len(windows) > 1:
            raise ValueError(f"Chain: at most one transform may observe queries; {windows} all do.")

    @property
    def window_size(self) -> int:
        return max(t.window_size for t in self.transforms)

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool):
        return self.transforms[-1].init_cache(config, batch, capacity, dtype, stacked)

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return min(t.max_budget(num_layers, capacity) for t in self.transforms)

    def after_turn(self, cache, observation, scale: float, new_capacity: int):
        for t in self.transforms:
            cache = t.after_turn(cache, observation, scale, new_capacity)
        return cache


def as_cache_transform(value) -> CacheTransform | None:
    """A model's `cache=` argument: a transform, a tuple/list of them (a `Chain`), or None / "dense"."""
    if value is None or (isinstance(value, str) and value == "dense"):
        return None
    if isinstance(value, (tuple, list)):
        value = tuple(t for t in value if t is not None)
        return None if not value else value[0] if len(value) == 1 else Chain(value)
    missing = [name for name in ("window_size", "init_cache", "max_budget", "after_turn")
               if not hasattr(value, name)]
    if missing:
        raise TypeError(f"{value!r} is not a cache transform (it lacks {', '.join(missing)}); use one from "
                        "lcjax.methods, e.g. snapkv(), kivi(), quest().")
    return value


def cache_nbytes(cache) -> int:
    """Bytes the cache pytree's arrays occupy (its real device footprint)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
