"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference") as a cache
transform: the cache keeps every token plus each page's channel-wise key min/max; at every decode step each KV
head reads only the pages whose upper-bound score for the step's query is highest (`token_budget` tokens), the
newest page always among them. Prefill and multi-token turns stay dense. SCBench's setting: pages
(`chunk_size`) of 16 tokens, a budget of 1024 tokens.

`QuestCache` is a `KVCache` with the bounds: written keys fold into their pages' bounds as they are appended
(decode steps touch one page per layer), and they are rebuilt from the keys whenever slots move wholesale, so
they stay exact after a press evicts tokens (`model.with_transforms(cache_transform=(SnapKVPress(), Quest()))`),
a crop or a capacity change. The math (bounds, scores, page choice, attention over the chosen pages) is in
`lcjax.methods.quest_pages` with float64 tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.cache import KVCache
from lcjax.cache.layers import layered, repeat_batch, set_layer
from lcjax.config import ModelConfig
from lcjax.methods import quest_pages


def _num_pages(capacity: int, page_size: int) -> int:
    return -(-capacity // page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestCache(KVCache):
    """A dense `KVCache` plus page bounds: kmin, kmax fp32 `[layers, batch, pages, kv_heads, head_dim]` (or
    per-layer tuples of `[batch, pages, kv_heads, head_dim]`), pages = ceil(capacity / page_size); empty pages
    hold +inf / -inf."""

    kmin: jax.Array | tuple[jax.Array, ...] = None
    kmax: jax.Array | tuple[jax.Array, ...] = None
    page_size: int = dataclasses.field(default=16, metadata=dict(static=True))
    token_budget: int = dataclasses.field(default=1024, metadata=dict(static=True))

    @classmethod
    def from_cache(cls, cache: KVCache, page_size: int, token_budget: int) -> "QuestCache":
        """`cache`'s tokens with bounds computed from its keys."""
        fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(KVCache)}
        return cls(**fields, page_size=page_size, token_budget=token_budget).with_bounds()

    def with_bounds(self) -> "QuestCache":
        """The bounds recomputed from every layer's valid keys (after eviction, a crop or a capacity change)."""
        if self.stacked:
            kmin, kmax = jax.vmap(lambda k, f: quest_pages.page_bounds(k, self.lengths, self.page_size, f))(
                self.k, self.first
            )
        else:
            pairs = [
                quest_pages.page_bounds(k, self.lengths, self.page_size, self.first[l]) for l, k in enumerate(self.k)
            ]
            kmin, kmax = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        return dataclasses.replace(self, kmin=kmin, kmax=kmax)

    def with_slots_rebuilt(self) -> "QuestCache":
        return self.with_bounds()

    def update(self, layer, k_new, v_new, start, lengths=None) -> "QuestCache":
        """`KVCache.update`, folding the written keys (those below `lengths`) into their pages' bounds."""
        cache = super().update(layer, k_new, v_new, start, lengths)
        seq = k_new.shape[1]
        lengths = start + seq if lengths is None else lengths
        slots = start[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
        kmin, kmax = quest_pages.update_page_bounds(
            self.kmin[layer], self.kmax[layer], k_new, slots, lengths, self.page_size
        )
        return dataclasses.replace(
            cache, kmin=set_layer(self.kmin, layer, kmin), kmax=set_layer(self.kmax, layer, kmax)
        )

    def attend_decode(self, q: jax.Array, layer, lengths: jax.Array, scale: float, implementation: str) -> jax.Array:
        """One query per sequence, `q: [batch, heads, head_dim]`, over the top pages of `layer` (its new key
        written; `lengths` counts it). Returns `[batch, heads, head_dim]`."""
        k, v = self.layer_kv(layer)
        return quest_pages.quest_decode_attention(
            q,
            k,
            v,
            lengths,
            self.kmin[layer],
            self.kmax[layer],
            scale=scale,
            token_budget=self.token_budget,
            page_size=self.page_size,
            first=self.layer_first(layer),
        )

    def fork(self, n: int) -> "QuestCache":
        cache = super().fork(n)
        return dataclasses.replace(cache, kmin=repeat_batch(self.kmin, n), kmax=repeat_batch(self.kmax, n))

    def with_capacity(self, capacity: int) -> "QuestCache":
        return super().with_capacity(capacity).with_bounds()

    def crop(self, max_length: int) -> "QuestCache":
        return super().crop(max_length).with_bounds()  # a min/max cannot forget the cropped keys


@dataclasses.dataclass(frozen=True)
class Quest:
    """Query-aware page selection at decode. `token_budget` tokens read per KV head and step (a multiple of
    `chunk_size`, the page size; SCBench's names and defaults)."""

    token_budget: int = 1024
    chunk_size: int = 16
    window_size: int = dataclasses.field(default=0, init=False)  # needs no queries

    def __post_init__(self):
        if self.chunk_size < 1 or self.token_budget < self.chunk_size or self.token_budget % self.chunk_size:
            raise ValueError(
                f"Quest: token_budget ({self.token_budget}) must be a positive multiple of chunk_size "
                f"({self.chunk_size})."
            )

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> QuestCache:
        if config.sliding_window is not None:
            raise ValueError("Quest selects pages over the whole cache; this model uses a sliding window.")
        dense = KVCache.init(
            config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim, dtype, stacked=stacked
        )
        shape = (batch, _num_pages(capacity, self.chunk_size), config.num_kv_heads, config.head_dim)
        full = lambda value: layered(config.num_layers, shape, jnp.float32, stacked, fill=value)
        fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(KVCache)}
        return QuestCache(
            **fields, kmin=full(jnp.inf), kmax=full(-jnp.inf), page_size=self.chunk_size, token_budget=self.token_budget
        )

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return capacity

    def after_turn(self, cache, observation, scale: float, new_capacity: int) -> QuestCache:
        if not isinstance(cache, QuestCache):
            raise ValueError(
                f"Quest needs the cache it makes (QuestCache), got {type(cache).__name__}; put Quest() "
                "last among the cache transforms."
            )
        return cache  # bounds follow every write, and a press's gather rebuilds them (with_slots_rebuilt)
