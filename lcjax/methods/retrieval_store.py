"""Host memory of RetrievalAttention caches: the keys and values that left the GPU, and their indexes.

A `HostStore` holds entries; each is one sequence's host part (every layer's keys, values and one index per
KV head) and is never changed once made, so a cache refers to it by an int id (`RetrievalCache.store_id`)
and `fork` shares it. A new turn makes a new entry from its parent plus the turn's tokens. The device calls in
through JAX callbacks: `append` at the end of a turn, `attend` at every decode step and layer (retrieval plus
attention over the retrieved keys, on the host), `gather` when a multi-token turn reads a whole layer.

Entries are dropped oldest first once they hold more than `max_bytes` (a cache whose entry was dropped fails
with an error saying so) or when `release` is called.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numba
import numpy as np
from ml_dtypes import bfloat16

from lcjax.methods.retrieval_index import FaissIndex, FlatIndex, KeyIndex, QueryGraphIndex

IndexKind = Literal["graph", "flat", "ivf", "hnsw"]


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How each KV head's keys are indexed: `kind` and the graph's settings (`QueryGraphIndex`)."""

    kind: IndexKind = "graph"
    per_query: int = 64
    beam: int = 128

    def __post_init__(self):
        if self.kind not in ("graph", "flat", "ivf", "hnsw"):
            raise ValueError(f"index must be one of graph, flat, ivf, hnsw; got {self.kind!r}.")


@dataclasses.dataclass
class _Entry:
    """One sequence's host part: keys float32 and values (bfloat16 if the model's are, else float32) per layer
    `[kv_heads, n, head_dim]` (head-major, so each head's keys are one contiguous block its index searches in
    place), per layer and KV head an index, and (graph) the training queries' top keys the graph was projected
    from."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    indexes: list[list[KeyIndex]]
    knn: list[list[np.ndarray]]

    @property
    def size(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        arrays = self.keys + self.values + [a for per in self.knn for a in per if a is not None]
        graphs = [getattr(i, "graph", None) for per in self.indexes for i in per]
        return sum(a.nbytes for a in arrays) + sum(g.nbytes for g in graphs if g is not None)


class HostStore:
    """Entries by id (0: none), oldest dropped past `max_bytes`. Thread-safe: callbacks may run concurrently."""

    def __init__(self, max_bytes: int = 64 * 2**30, threads: int | None = None):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._next = 1
        self._lock = threading.Lock()
        self.threads = threads or min(32, (os.cpu_count() or 1) + 4)
        self._pool = ThreadPoolExecutor(self.threads)

    def __repr__(self) -> str:
        return f"HostStore({len(self._entries)} entries, {self.nbytes() / 2**20:.1f} MiB)"

    def entry(self, sid: int) -> _Entry | None:
        if sid == 0:
            return None
        with self._lock:
            e = self._entries.get(int(sid))
        if e is None:
            raise KeyError(
                f"RetrievalAttention: host entry {int(sid)} was released (the store keeps at most "
                f"{self.max_bytes / 2**30:.1f} GiB, oldest dropped first); raise HostStore.max_bytes or release "
                "caches you no longer use."
            )
        return e

    def nbytes(self, ids=None) -> int:
        """Host bytes of the given entries (default: all)."""
        with self._lock:
            chosen = self._entries.values() if ids is None else [self._entries.get(int(i)) for i in set(ids) if i]
            return sum(e.nbytes for e in chosen if e is not None)

    def release(self, ids) -> None:
        with self._lock:
            for i in set(int(i) for i in np.ravel(ids)):
                self._entries.pop(i, None)

    def _add(self, entry: _Entry) -> int:
        with self._lock:
            sid = self._next
            self._next += 1
            self._entries[sid] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
            return sid

    def append(
        self,
        ids: np.ndarray,
        counts: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        queries: np.ndarray,
        query_valid: np.ndarray,
        knn: np.ndarray,
        settings: IndexSettings,
    ) -> np.ndarray:
        """New entries: each sequence's parent (`ids`, int32 `[batch]`) plus its first `counts[b]` moved tokens.

        keys, values: `[layers, batch, slots, kv_heads, head_dim]`; queries: the turn's last queries `[layers,
        batch, window, heads, head_dim]`, valid where `query_valid [batch, window]`; knn: int32 `[layers, batch,
        kv_heads, group * window, per_query]`, each training query's best moved tokens (slots; the device computed
        them). Returns the new ids, int32 `[batch]` (a sequence that moved nothing keeps its id).
        """
        # callbacks may hand over device arrays: everything below is NumPy
        ids, counts, keys, values, queries, query_valid, knn = map(
            np.asarray, (ids, counts, keys, values, queries, query_valid, knn)
        )
        out = ids.astype(np.int32)
        # every parent looked up before any entry is added: adding one may drop the oldest entries
        parents = {b: self.entry(int(ids[b])) for b in range(len(ids)) if counts[b] > 0}
        for b, parent in parents.items():
            n = int(counts[b])
            out[b] = self._add(
                self._extend(
                    parent, keys[:, b, :n], values[:, b, :n], queries[:, b], query_valid[b], knn[:, b], settings
                )  # fmt: skip
            )
        return out

    def _extend(self, parent, keys, values, queries, valid, knn, settings) -> _Entry:
        layers, moved, kv_heads, d = keys.shape
        group = queries.shape[2] // kv_heads
        base = 0 if parent is None else parent.size
        new_keys = [_head_major(keys[l], np.float32) for l in range(layers)]
        new_values = [_head_major(values[l], _value_dtype(values.dtype)) for l in range(layers)]
        if parent is not None:
            new_keys = [np.concatenate([parent.keys[l], new_keys[l]], axis=1) for l in range(layers)]
            new_values = [np.concatenate([parent.values[l], new_values[l]], axis=1) for l in range(layers)]
        rows = np.tile(valid, group)  # training queries of a KV head: its group's heads, window-major per head

        def build(l: int, h: int) -> tuple[KeyIndex, np.ndarray | None]:
            head_keys = new_keys[l][h]
            if settings.kind == "flat":
                return FlatIndex(head_keys), None
            if settings.kind in ("ivf", "hnsw"):
                return FaissIndex(head_keys, settings.kind), None
            q = queries[l, :, h * group : (h + 1) * group].transpose(1, 0, 2).reshape(-1, d)[rows]
            local = knn[l, h][rows].astype(np.int64)
            top = np.where(local < moved, local, local[:, :1]) + base  # slots past the moved tokens: the best one
            if parent is not None:  # the new queries' best among the parent's keys, by searching its graph
                old, _ = parent.indexes[l][h].search(q, top.shape[1])
                top = _best_of(head_keys, q, np.concatenate([old, top], axis=1), top.shape[1])
                top = np.concatenate(_same_width(parent.knn[l][h], top))
            return _graph_or_flat(head_keys, top, settings), top

        jobs = {(l, h): self._pool.submit(build, l, h) for l in range(layers) for h in range(kv_heads)}
        built = {key: job.result() for key, job in jobs.items()}
        return _Entry(
            keys=new_keys,
            values=new_values,
            indexes=[[built[l, h][0] for h in range(kv_heads)] for l in range(layers)],
            knn=[[built[l, h][1] for h in range(kv_heads)] for l in range(layers)],
        )

    def attend(self, ids: np.ndarray, layer, q: np.ndarray, top_k: int, scale: float) -> tuple[np.ndarray, ...]:
        """Each sequence's query heads `q [batch, heads, head_dim]` over the `top_k` keys its index returns in
        `layer`: the attention output float32 `[batch, heads, head_dim]` and its log-sum-exp `[batch, heads]`
        (-inf and zeros where a sequence has no host part).

        Heads run on the store's threads (the searches and the attention release the GIL): one task per KV head,
        or per query head where that leaves threads idle."""
        layer, ids, q = int(layer), np.asarray(ids), np.asarray(q, np.float32)
        batch, heads, d = q.shape
        out = np.zeros((batch, heads, d), np.float32)
        lse = np.full((batch, heads), -np.inf, np.float32)
        entries = [self.entry(int(sid)) for sid in ids]
        tasks = []
        for b, e in enumerate(entries):
            if e is None:
                continue
            kv_heads = e.keys[layer].shape[0]
            group = heads // kv_heads
            split = batch * kv_heads < self.threads  # query heads apart: more tasks than threads
            for h in range(kv_heads):
                for first in range(0, group, 1 if split else group):
                    rows = slice(h * group + first, h * group + (first + 1 if split else group))
                    tasks.append((e, b, h, rows))

        def run(task):
            e, b, h, rows = task
            found, _ = e.indexes[layer][h].search(q[b, rows], min(top_k, e.size))
            values = e.values[layer][h]
            bf16 = values.dtype == bfloat16
            values = values.view(np.uint16) if bf16 else values
            keys, scale32 = e.keys[layer][h], np.float32(scale)
            _attend_found(keys, values, bf16, found, q[b, rows], scale32, out[b, rows], lse[b, rows])

        for _ in self._pool.map(run, tasks):
            pass
        return out, lse

    def gather(self, ids: np.ndarray, layer, slots: int, tail: tuple[int, int], dtype) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of `layer` for each sequence, `[batch, slots, *tail]` (tail: kv_heads, head_dim) in
        `dtype`, zeros past a sequence's host part."""
        layer, ids = int(layer), np.asarray(ids)
        k = np.zeros((len(ids), slots, *tail), dtype)
        v = np.zeros_like(k)
        for b, sid in enumerate(ids):
            e = self.entry(int(sid))
            if e is not None:
                k[b, : e.size] = e.keys[layer].transpose(1, 0, 2).astype(dtype)
                v[b, : e.size] = e.values[layer].transpose(1, 0, 2).astype(dtype)
        return k, v

    def cropped(self, ids: np.ndarray, keep: np.ndarray, settings: IndexSettings) -> np.ndarray:
        """New entries holding each sequence's first `keep[b]` host tokens (the same id where nothing is cut);
        indexes are rebuilt from the kept keys and the training queries' top keys among them."""
        ids, keep = np.asarray(ids), np.asarray(keep)
        out = ids.astype(np.int32)
        for b, sid in enumerate(ids):
            e = self.entry(int(sid))
            n = int(keep[b])
            if e is None or n >= e.size:
                continue
            if n <= 0:
                out[b] = 0
                continue
            keys = [k[:, :n] for k in e.keys]
            knn = [[_kept(t, n) for t in per] if per[0] is not None else per for per in e.knn]

            def build(l, h, keys=keys, knn=knn):
                head = keys[l][h]
                if settings.kind == "graph" and len(knn[l][h]):
                    return _graph_or_flat(head, knn[l][h], settings)
                return FaissIndex(head, settings.kind) if settings.kind in ("ivf", "hnsw") else FlatIndex(head)

            layers, kv_heads = len(keys), keys[0].shape[0]
            indexes = [[build(l, h) for h in range(kv_heads)] for l in range(layers)]
            out[b] = self._add(_Entry(keys, [v[:, :n] for v in e.values], indexes, knn))
        return out


def _graph_or_flat(keys: np.ndarray, knn: np.ndarray, settings: IndexSettings) -> KeyIndex:
    """The graph projected from `knn`, or a flat index where the lists are too short to link keys (fewer than two
    slots could leave the window)."""
    width = knn.shape[1]
    if width < 2:
        return FlatIndex(keys)
    return QueryGraphIndex(keys, None, per_query=width, beam=settings.beam, knn=knn)


def _same_width(*lists: np.ndarray) -> list[np.ndarray]:
    """Top-key lists of different widths padded to the widest by repeating each list's best id (a short turn's
    lists must not narrow the earlier, wider ones)."""
    width = max(x.shape[1] for x in lists)
    return [np.concatenate([x, np.repeat(x[:, :1], width - x.shape[1], axis=1)], axis=1) for x in lists]


def _best_of(keys: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Per query, the `k` candidate ids (distinct, -1 ignored) of largest inner product, best first."""
    out = np.empty((len(queries), k), np.int64)
    for i, (q, c) in enumerate(zip(queries, candidates)):
        c = np.unique(c[c >= 0])
        top = c[np.argsort(-(keys[c] @ q), kind="stable")[:k]]
        out[i] = np.pad(top, (0, k - len(top)), constant_values=top[-1] if len(top) else 0)
    return out


def _kept(top: np.ndarray, n: int) -> np.ndarray:
    """Training queries' top-key lists with ids >= n replaced by each list's best kept id; lists with none kept
    are dropped."""
    ok = top < n
    rows = ok.any(axis=1)
    top, ok = top[rows], ok[rows]
    best = top[np.arange(len(top)), ok.argmax(axis=1)]
    return np.where(ok, top, best[:, None])


def _value_dtype(dtype) -> np.dtype:
    """Values stay bfloat16 on the host (the attention reads their bits); other dtypes become float32."""
    return np.dtype(bfloat16) if dtype == bfloat16 else np.dtype(np.float32)


def _head_major(x: np.ndarray, dtype) -> np.ndarray:
    """`[n, kv_heads, head_dim]` as a contiguous `[kv_heads, n, head_dim]` of `dtype`."""
    return np.ascontiguousarray(x.transpose(1, 0, 2), dtype)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _attend_found(keys, values, bf16, found, q, scale, out, lse):
    """Softmax attention of queries `q [g, d]` over their found keys (`found [g, k]` ids into `keys [n, d]`, -1
    skipped): writes out `[g, d]` and lse `[g]` (left as they are where nothing was found). values `[n, d]`:
    float32, or bfloat16's bits as uint16 when `bf16` (a bfloat16 is a float32's upper half)."""
    g, k = found.shape
    d = keys.shape[1]
    s = np.empty(k, np.float32)
    bits = np.empty(d, np.uint32)
    row = bits.view(np.float32)
    for i in range(g):
        m = np.float32(-np.inf)
        for r in range(k):
            j = found[i, r]
            if j < 0:
                continue
            acc = np.float32(0.0)
            for t in range(d):
                acc += q[i, t] * keys[j, t]
            s[r] = acc * scale
            m = max(m, s[r])
        if m == -np.inf:
            continue
        total = np.float32(0.0)
        out[i, :] = 0.0
        for r in range(k):
            j = found[i, r]
            if j < 0:
                continue
            p = np.exp(s[r] - m)
            total += p
            if bf16:
                for t in range(d):
                    bits[t] = np.uint32(values[j, t]) << 16
            else:
                for t in range(d):
                    row[t] = values[j, t]
            for t in range(d):
                out[i, t] += p * row[t]
        for t in range(d):
            out[i, t] /= total
        lse[i] = m + np.log(total)
