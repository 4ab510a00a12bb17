"""RetrievalAttention (Liu et al. 2024, arXiv 2409.10516, "RetrievalAttention: Accelerating Long-Context LLM
Inference via Vector Retrieval") as a cache transform: the GPU keeps a window of the cache (the first `sink` and
the last `recent` tokens, plus the turn's new ones), the rest lives in host memory with an index per KV head
built from the turn's own queries (`lcjax.methods.retrieval_index`), and every decode step attends to the window
on the GPU and to the `top_k` keys the index returns on the host, the two merged by their log-sum-exps.

The prefill runs dense on the GPU. At the end of the turn, on the GPU, each of the turn's last `train_queries`
queries finds its exact top keys among the tokens leaving the window (the index's training data, as the paper
computes it on the GPU); the leaving tokens, those lists and the queries then go to the host (`HostStore`),
which builds the indexes, and the GPU cache shrinks to the window plus the room asked for after the prompt.
A later turn (`extend`) reads whole layers back from the host (exact attention for the turn's tokens), then its
tokens leave the window the same way; their indexes take the parent's graph plus the new queries' top keys.

Slots keep their logical numbering (`lengths` and `positions` count every token, as in a dense cache), so the
model and `generate` see one cache. Settings follow the paper: a window of 128 + 512 tokens, 100 keys
retrieved per query head (SCBench's kv-retrieval runs use 2000). `model.with_transforms(
cache_transform=RetrievalAttention())`; with MInference prefill, `attention=MInference(...)` beside it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lcjax.cache import KVCache
from lcjax.config import ModelConfig
from lcjax.methods.retrieval_store import HostStore, IndexKind, IndexSettings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetrievalCache(KVCache):
    """A `KVCache` whose arrays hold the GPU window; the host part lives in `method.store`.

    k, v: `[layers, batch, slots, kv_heads, head_dim]` (or per-layer tuples): logical slots `[0, sink)` at the
    same physical slots, logical slots from `sink + host_len` on at `slot - host_len`; logical slots `[sink, sink
    + host_len)` are on the host. host_len, store_id: int32 `[batch]` (store id 0: no host part). host_capacity:
    a static bound on host_len, so `capacity` (logical) is `slots + host_capacity`.
    """

    host_len: jax.Array = None
    store_id: jax.Array = None
    host_capacity: int = dataclasses.field(default=0, metadata=dict(static=True))
    method: RetrievalAttention = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def slots(self) -> int:
        """Physical slots per sequence on the GPU."""
        return super().capacity

    @property
    def capacity(self) -> int:
        return self.slots + self.host_capacity

    def slots_needed(self, new_tokens: int) -> int:
        """The logical capacity `new_tokens` more tokens need: they land in the GPU window, so the window's fullest
        sequence decides (plus `host_capacity`, which `capacity` counts too)."""
        return int(jnp.max(self.lengths - self.host_len)) + new_tokens + self.host_capacity

    def host_nbytes(self) -> int:
        """Host memory this cache's sequences use (entries shared by forks counted once)."""
        return self.method.store.nbytes(np.asarray(self.store_id))

    def update(self, layer, k_new, v_new, start, lengths=None) -> RetrievalCache:
        # a turn's tokens come after the host part, so their physical slot is the logical one less host_len
        return super().update(layer, k_new, v_new, start - self.host_len, lengths)

    def attend_decode(self, q: jax.Array, layer, lengths: jax.Array, scale: float, implementation: str) -> jax.Array:
        """`q: [batch, heads, head_dim]` over the window (GPU) and the retrieved host keys (host), merged by
        log-sum-exp. Returns `[batch, heads, head_dim]`."""
        k, v = super().layer_kv(layer)
        out_w, lse_w = window_attention(q, k, v, self.layer_first(layer), lengths - self.host_len, scale)
        batch, heads, d = q.shape
        shapes = (
            jax.ShapeDtypeStruct((batch, heads, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads), jnp.float32),
        )
        attend = partial(self.method.store.attend, top_k=self.method.top_k, scale=scale)
        out_h, lse_h = jax.pure_callback(
            attend, shapes, self.store_id, jnp.asarray(layer, jnp.int32), q.astype(jnp.float32)
        )
        return merge_attention(out_w, lse_w, out_h, lse_h).astype(q.dtype)

    def layer_kv(self, layer) -> tuple[jax.Array, jax.Array]:
        """Keys and values of one layer in logical slots, `[batch, capacity, kv_heads, head_dim]`: the host part
        read back (multi-token turns attend to every token)."""
        k, v = super().layer_kv(layer)
        if not self.host_capacity:
            return k, v
        batch, _, kv_heads, d = k.shape
        shape = jax.ShapeDtypeStruct((batch, self.host_capacity, kv_heads, d), k.dtype)
        gather = partial(
            self.method.store.gather, slots=self.host_capacity, tail=(kv_heads, d), dtype=np.dtype(k.dtype)
        )
        hk, hv = jax.pure_callback(gather, (shape, shape), self.store_id, jnp.asarray(layer, jnp.int32))
        slot = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
        host_len = self.host_len[:, None]
        on_host = (slot >= self.method.sink) & (slot < self.method.sink + host_len)
        physical = jnp.clip(jnp.where(slot < self.method.sink, slot, slot - host_len), 0, self.slots - 1)
        hosted = jnp.clip(slot - self.method.sink, 0, self.host_capacity - 1)
        pick = lambda gpu, host: jnp.where(
            on_host[..., None, None],
            jnp.take_along_axis(host, hosted[..., None, None], axis=1),
            jnp.take_along_axis(gpu, physical[..., None, None], axis=1),
        )
        return pick(k, hk), pick(v, hv)

    def rotate_keys(self, rotate) -> RetrievalCache:
        raise NotImplementedError(
            "RetrievalAttention keeps most keys on the host: re-rotating them (a LongRoPE model crossing its "
            "switch) is not supported; prefill past the switch instead."
        )

    def fork(self, n: int) -> RetrievalCache:
        """Each sequence repeated n times; the host entries are shared (they never change)."""
        cache = super().fork(n)
        return dataclasses.replace(
            cache, host_len=jnp.repeat(self.host_len, n, axis=0), store_id=jnp.repeat(self.store_id, n, axis=0)
        )

    def crop(self, max_length: int) -> RetrievalCache:
        """Forgets every logical slot at or past `max_length`, host tokens included (their entries are copied
        without them, indexes rebuilt)."""
        keep = jnp.clip(max_length - self.method.sink, 0, self.host_len)
        ids = io_callback(
            partial(self.method.store.cropped, settings=self.method.index_settings),
            jax.ShapeDtypeStruct(self.store_id.shape, jnp.int32),
            self.store_id,
            keep,
            ordered=True,
        )
        return dataclasses.replace(super().crop(max_length), host_len=keep, store_id=ids)


def window_attention(q, k, v, lo, hi, scale) -> tuple[jax.Array, jax.Array]:
    """One query per sequence and head, `q: [batch, heads, head_dim]`, over physical slots `[lo, hi)` of `k, v:
    [batch, slots, kv_heads, head_dim]`: output float32 `[batch, heads, head_dim]` and log-sum-exp `[batch, heads]`
    (-inf where no slot is valid)."""
    batch, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, d)
    s = jnp.einsum("bkgd,bpkd->bkgp", qg, k, preferred_element_type=jnp.float32) * scale
    slot = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
    valid = ((slot >= lo[:, None]) & (slot < hi[:, None]))[:, None, None, :]
    s = jnp.where(valid, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgp,bpkd->bkgd", p, v.astype(jnp.float32))
    return out.reshape(batch, heads, d), lse.reshape(batch, heads)


def merge_attention(out_a, lse_a, out_b, lse_b) -> jax.Array:
    """Attention over the union of two disjoint key sets from each part's normalised output and log-sum-exp:
    outputs `[..., head_dim]`, lse `[...]` (-inf: an empty part)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    return (out_a * wa[..., None] + out_b * wb[..., None]) / jnp.maximum(wa + wb, 1e-30)[..., None]


def training_knn(q: jax.Array, valid: jax.Array, keys: jax.Array, count: jax.Array, per_query: int,
                 block: int = 256) -> jax.Array:  # fmt: skip
    """Each training query's best `per_query` keys among the first `count[b]` slots of `keys`.

    q: `[layers, batch, window, heads, head_dim]`; valid: bool `[batch, window]` (invalid queries still get
    lists: the host skips them); keys: `[layers, batch, slots, kv_heads, head_dim]`; count: int32 `[batch]`.
    Returns int32 `[layers, batch, kv_heads, group * window, per_query]`, queries ordered head by head within
    the group; queries run `block` at a time so the scores held are `[batch, kv_heads, block, slots]`.
    """
    del valid
    layers, batch, window, heads, d = q.shape
    kv_heads, slots = keys.shape[3], keys.shape[2]
    group = heads // kv_heads
    rows = group * window
    qg = q.reshape(layers, batch, window, kv_heads, group, d).transpose(0, 1, 3, 4, 2, 5)
    qg = qg.reshape(layers, batch, kv_heads, rows, d)
    pad = -rows % block
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    ok = jnp.arange(slots, dtype=jnp.int32)[None, None, None, :] < count[:, None, None, None]
    k = min(per_query, slots)

    def layer_lists(args):
        ql, kl = args  # [batch, kv_heads, rows, d], [batch, slots, kv_heads, d]

        def block_lists(start):
            qb = jax.lax.dynamic_slice_in_dim(ql, start, block, axis=2)
            s = jnp.einsum("bhqd,bshd->bhqs", qb, kl, preferred_element_type=jnp.float32)
            return jax.lax.top_k(jnp.where(ok, s, -jnp.inf), k)[1]

        lists = jax.lax.map(block_lists, jnp.arange(0, rows + pad, block))  # [blocks, batch, kv, block, k]
        return jnp.moveaxis(lists, 0, 2).reshape(batch, kv_heads, rows + pad, k)[:, :, :rows]

    return jax.lax.map(layer_lists, (qg, keys)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalAttention:
    """The cache transform. sink, recent: tokens the GPU window keeps at the start and the end of the context;
    top_k: keys retrieved per query head and step; index: "graph" (the paper's attention-aware index), "flat"
    (exact, SCBench's `retr_attn`), "ivf" or "hnsw" (faiss, built from the keys alone); train_queries: a turn's
    last queries the index learns from; per_query: top keys taken of each; beam: the graph search's candidate
    list; max_host_bytes: host memory the store may hold before it drops its oldest entries. `store` is where the
    host parts live: one per value (two RetrievalAttention values never share entries, and each compiles its own
    steps)."""

    sink: int = 128
    recent: int = 512
    top_k: int = 100
    index: IndexKind = "graph"
    train_queries: int = 2048
    per_query: int = 64
    beam: int = 128
    max_host_bytes: int = 64 * 2**30
    store: HostStore = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "store", HostStore(self.max_host_bytes))
        if self.sink < 0 or self.recent < 1 or self.top_k < 1 or self.train_queries < 1:
            raise ValueError(
                f"RetrievalAttention needs sink >= 0, recent >= 1, top_k >= 1 and train_queries >= 1; got sink "
                f"{self.sink}, recent {self.recent}, top_k {self.top_k}, train_queries {self.train_queries}."
            )
        IndexSettings(self.index, self.per_query, self.beam)  # checks the index settings

    @property
    def window_size(self) -> int:
        return self.train_queries

    @property
    def index_settings(self) -> IndexSettings:
        return IndexSettings(self.index, self.per_query, self.beam)

    def init_cache(self, config: ModelConfig, batch: int, capacity: int, dtype, stacked: bool) -> RetrievalCache:
        if config.sliding_window is not None:
            raise ValueError("RetrievalAttention retrieves over the whole context; this model uses a sliding window.")
        dense = KVCache.init(
            config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim, dtype, stacked=stacked
        )
        fields = {f.name: getattr(dense, f.name) for f in dataclasses.fields(KVCache)}
        zeros = jnp.zeros((batch,), jnp.int32)
        return RetrievalCache(**fields, host_len=zeros, store_id=zeros, method=self)

    def max_budget(self, num_layers: int, capacity: int) -> int:
        return min(capacity, self.sink + self.recent)

    def after_turn(self, cache, observation, scale: float, new_capacity: int) -> RetrievalCache:
        """Moves the tokens past the window to the host (indexed from the turn's queries) and keeps the window
        plus `new_capacity`'s room on the GPU."""
        if not isinstance(cache, RetrievalCache) or cache.method is not self:
            raise ValueError(
                f"RetrievalAttention needs the cache it makes, got {type(cache).__name__}; put it last among the "
                "cache transforms (a press before it is not supported)."
            )
        movable = cache.slots - self.sink - self.recent  # a static bound on the tokens leaving the window
        if movable <= 0:
            return cache
        stacked = cache.stacked
        stack = (lambda x: x) if stacked else jnp.stack
        k, v = stack(cache.k), stack(cache.v)
        moving = jnp.clip(cache.lengths - cache.host_len - self.sink - self.recent, 0, movable)
        leaving_k, leaving_v = k[:, :, self.sink : self.sink + movable], v[:, :, self.sink : self.sink + movable]
        knn = training_knn(observation.q, observation.valid, leaving_k, moving, self.per_query)
        ids = io_callback(
            partial(self.store.append, settings=self.index_settings),
            jax.ShapeDtypeStruct(cache.store_id.shape, jnp.int32),
            cache.store_id,
            moving,
            leaving_k,
            leaving_v,
            observation.q,
            observation.valid,
            knn,
            ordered=True,
        )
        # the window closes up: slot j (past the sink) takes the token `moving` slots later
        slots = cache.slots - max(0, cache.capacity - new_capacity)
        j = jnp.arange(slots, dtype=jnp.int32)[None, :]
        src = jnp.clip(jnp.where(j < self.sink, j, j + moving[:, None]), 0, cache.slots - 1)
        close = lambda x: jnp.take_along_axis(x, src[None, :, :, None, None], axis=2)
        k, v = close(k), close(v)
        if not stacked:
            k, v = tuple(k), tuple(v)
        return dataclasses.replace(
            cache, k=k, v=v, host_len=cache.host_len + moving, store_id=ids,
            host_capacity=host_bucket(cache.host_capacity + movable),
        )  # fmt: skip


def host_bucket(n: int) -> int:
    """`n` rounded up to a step of 1/8 to 1/16 of itself (at least 256): the static host capacity, so turns that
    move a few tokens each keep one compiled decode loop and extend (at most 12.5% more slots read back)."""
    if n <= 0:
        return 0
    step = 2 ** max(8, n.bit_length() - 4)
    return -(-n // step) * step
