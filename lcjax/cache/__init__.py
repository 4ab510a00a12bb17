"""KV caches: the protocol every cache implements, the dense `KVCache`, and the cache-transform protocol.

A new cache (quantised, paged, host-resident, shared-prefix) implements `Cache` in its method's file; a new
cache transform (a press, an index builder) implements `CacheTransform`. The model knows only these two.
"""

from lcjax.cache.dense import DenseStorage, KVCache
from lcjax.cache.protocol import (
    Cache,
    CacheTransform,
    Chain,
    Observation,
    as_cache_transform,
    cache_nbytes,
    empty_observation,
    observe_rows,
)

__all__ = [
    "Cache",
    "CacheTransform",
    "Chain",
    "DenseStorage",
    "KVCache",
    "Observation",
    "as_cache_transform",
    "cache_nbytes",
    "empty_observation",
    "observe_rows",
]
