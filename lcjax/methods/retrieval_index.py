"""Host-side key indexes for RetrievalAttention (Liu et al. 2024, arXiv 2409.10516): given decode queries, find
the keys with the largest inner products without scanning every key.

Decode queries are out of distribution for the keys they search (a query and its top keys lie far apart), so
indexes built from the keys alone (IVF, HNSW) scan a large share of them for high recall. RetrievalAttention's
index is built from the prefill's own queries, as RoarGraph (Chen et al. 2024) builds one for cross-modal
search: each training query's exact top keys are linked to the best of them (its pivot), so a graph walk that
reaches a key a query would like next reaches the other keys such queries like too.

`QueryGraphIndex` is that graph: every pivot's out-edges are the keys most often co-retrieved with it (at most
`degree`), edges are mirrored where a node has room, and each key is linked to its sequence neighbours so
every key is reachable. Search is a best-first beam walk from the most-used pivots, compiled with numba. Also
here, behind the same `search`: `FlatIndex` (exact; what SCBench's `retr_attn` uses) and `FaissIndex` (faiss
IVF and HNSW, the off-the-shelf baselines).

Every index holds one head's keys, float32 `[n, head_dim]`, and answers `search(queries [m, head_dim], k)` with
ids int64 `[m, k]` ordered by descending inner product (-1 past the keys found) and the keys each query scanned
(int64 `[m]`: the inner products it computed).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import faiss
import numba
import numpy as np


class KeyIndex(Protocol):
    """What RetrievalAttention calls on an index of one head's keys."""

    @property
    def size(self) -> int:
        """Keys held."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 `[m, k]`, best first, -1 where fewer were found; scanned int64 `[m]`) for `queries [m, d]`."""


def _check_search(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [m, {dim}], got shape {queries.shape}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    return queries


def _check_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.ascontiguousarray(keys, np.float32)
    if keys.ndim != 2 or keys.shape[0] < 1:
        raise ValueError(f"keys must be a non-empty [n, head_dim] array, got shape {keys.shape}.")
    return keys


def exact_top_k(keys: np.ndarray, queries: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Ids int64 `[m, min(k, n)]` of each query's `k` keys of largest inner product, best first (queries in
    blocks of `block`, so the scores held are `[block, n]`)."""
    k = min(k, keys.shape[0])
    out = np.empty((queries.shape[0], k), np.int64)
    for start in range(0, queries.shape[0], block):
        scores = queries[start : start + block] @ keys.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(top, order, axis=1)
    return out


def _padded(ids: np.ndarray, k: int) -> np.ndarray:
    if ids.shape[1] >= k:
        return ids[:, :k]
    return np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1, np.int64)], axis=1)


@dataclasses.dataclass
class FlatIndex:
    """Exact search: every key scanned."""

    keys: np.ndarray

    def __post_init__(self):
        self.keys = _check_keys(self.keys)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_search(queries, self.keys.shape[1], k)
        ids = _padded(exact_top_k(self.keys, queries, k), k)
        return ids, np.full(queries.shape[0], self.size, np.int64)


@dataclasses.dataclass
class FaissIndex:
    """faiss's inner-product IVF (`kind="ivf"`: `lists` k-means lists, `probes` searched) or HNSW (`kind="hnsw"`:
    `links` per node, `ef` the search's candidate list), built from the keys alone. scanned: faiss's own count
    of distances computed."""

    keys: np.ndarray
    kind: Literal["ivf", "hnsw"] = "ivf"
    lists: int | None = None  # default: 4 sqrt(n)
    probes: int = 16
    links: int = 32
    ef: int = 64

    def __post_init__(self):
        self.keys = _check_keys(self.keys)
        n, d = self.keys.shape
        if self.kind == "ivf":
            lists = self.lists or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 keys a list
            self._index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
            self._index.train(self.keys)
        elif self.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(d, self.links, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"FaissIndex kind must be 'ivf' or 'hnsw', got {self.kind!r}.")
        self._index.add(self.keys)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_search(queries, self.keys.shape[1], k)
        ids = np.empty((queries.shape[0], k), np.int64)
        scanned = np.empty(queries.shape[0], np.int64)
        if self.kind == "ivf":
            self._index.nprobe = self.probes
            stats = faiss.cvar.indexIVF_stats
        else:
            self._index.hnsw.efSearch = max(self.ef, k)
            stats = faiss.cvar.hnsw_stats
        for i, q in enumerate(queries):  # one at a time: faiss counts distances per call
            stats.reset()
            _, ids[i] = self._index.search(q[None], k)
            scanned[i] = stats.ndis
        return ids, scanned


@dataclasses.dataclass
class QueryGraphIndex:
    """RetrievalAttention's attention-aware index: a graph over the keys projected from the training queries'
    exact top keys (see the module's docstring).

    keys: float32 `[n, d]`; queries: float32 `[m, d]`, the prefill's queries for this head (or its query
    group), or None when `knn` is given; per_query: top keys taken of each training query; pivots: how many of
    them (the best; at most per_query) link to the others; degree: out-edges a key keeps from the projection, the
    most often co-retrieved (plus two sequence links); entries: start nodes of every search (the most-used
    pivots); beam: the search's candidate list (>= k; wider scans more and finds more). knn: the training queries'
    top keys if already computed (int `[m, >= per_query]`, best first, e.g. on the accelerator).
    """

    keys: np.ndarray
    queries: dataclasses.InitVar[np.ndarray | None]
    per_query: int = 64
    pivots: int = 4
    degree: int = 64
    entries: int = 16
    beam: int = 128
    knn: dataclasses.InitVar[np.ndarray | None] = None

    def __post_init__(self, queries, knn):
        self.keys = _check_keys(self.keys)
        n = self.keys.shape[0]
        if queries is None and knn is None:
            raise ValueError("QueryGraphIndex needs the training queries or their top keys (knn).")
        if queries is not None:
            queries = _check_search(queries, self.keys.shape[1], 1)
        if self.per_query < 2 or min(self.pivots, self.degree, self.entries, self.beam) < 1:
            raise ValueError(
                f"QueryGraphIndex needs per_query >= 2 and pivots, degree, entries, beam >= 1; got per_query "
                f"{self.per_query}, pivots {self.pivots}, degree {self.degree}, entries {self.entries}, "
                f"beam {self.beam}."
            )
        if knn is not None:
            m = knn.shape[0] if queries is None else queries.shape[0]
            if knn.ndim != 2 or knn.shape[0] != m or knn.shape[1] < min(self.per_query, n):
                raise ValueError(f"knn must be [{m}, >= {self.per_query}], got shape {knn.shape}.")
        if knn is None:
            knn = exact_top_k(self.keys, queries, self.per_query)
        knn = np.ascontiguousarray(knn[:, : self.per_query], np.int64)
        self.graph, pivot_uses = _project(knn, n, self.degree, min(self.pivots, knn.shape[1]))
        order = np.argsort(-pivot_uses, kind="stable")
        self.entry_ids = order[: min(self.entries, n)].astype(np.int32)  # the graph's own type

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def search(self, queries: np.ndarray, k: int, beam: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_search(queries, self.keys.shape[1], k)
        beam = max(k, beam or self.beam)
        ids = np.full((queries.shape[0], k), -1, np.int64)
        scanned = np.zeros(queries.shape[0], np.int64)
        _beam_search(self.keys, self.graph, self.entry_ids, queries, beam, ids, scanned)
        return ids, scanned


@numba.njit(cache=True, nogil=True)
def _project(knn: np.ndarray, n: int, degree: int, pivots: int) -> tuple[np.ndarray, np.ndarray]:
    """The projected graph, int32 `[n, degree + 2]` (-1: no edge; int32 halves a long context's host memory),
    and how often each key was a pivot: each training query's best `pivots` keys take its other top keys as
    candidates, each key keeps the `degree` candidates that came with it most often."""
    m, per = knn.shape
    uses = np.zeros(n, np.int64)
    for j in range(m):
        for r in range(pivots):
            uses[knn[j, r]] += 1
    starts = np.zeros(n + 1, np.int64)
    for p in range(n):
        starts[p + 1] = starts[p] + uses[p] * (per - 1)
    cand = np.empty(starts[n], np.int64)
    fill = starts[:n].copy()
    for j in range(m):
        for r0 in range(pivots):
            p = knn[j, r0]
            for r in range(per):
                if r != r0:
                    cand[fill[p]] = knn[j, r]
                    fill[p] += 1
    width = degree + 2
    graph = np.full((n, width), -1, np.int32)
    count = np.zeros(n, np.int64)
    for p in range(n):
        c = np.sort(cand[starts[p] : starts[p + 1]])
        if c.size == 0:
            continue
        # distinct candidates and how often each came with p: the most frequent are kept
        distinct = np.empty(c.size, np.int64)
        freq = np.empty(c.size, np.int64)
        u = 0
        for i in range(c.size):
            if c[i] == p:
                continue
            if u > 0 and distinct[u - 1] == c[i]:
                freq[u - 1] += 1
            else:
                distinct[u] = c[i]
                freq[u] = 1
                u += 1
        order = np.argsort(-freq[:u], kind="mergesort")
        for i in range(min(degree, u)):
            graph[p, count[p]] = distinct[order[i]]
            count[p] += 1
    # mirror the edges where the far end has room, so a walk can also come back
    for p in range(n):
        for i in range(count[p]):
            c = graph[p, i]
            if count[c] >= degree:
                continue
            seen = False
            for t in range(count[c]):
                if graph[c, t] == p:
                    seen = True
                    break
            if not seen:
                graph[c, count[c]] = p
                count[c] += 1
    # sequence links: keys of neighbouring tokens, so keys no training query chose stay reachable
    for p in range(n):
        if p > 0:
            graph[p, count[p]] = p - 1
            count[p] += 1
        if p + 1 < n:
            graph[p, count[p]] = p + 1
            count[p] += 1
    return graph, uses


@numba.njit(cache=True, nogil=True)
def _beam_search(keys, graph, entries, queries, beam, ids, scanned):
    m = queries.shape[0]
    k = ids.shape[1]
    for i in range(m):  # a call holds one head's few queries: threads would cost more than they save
        found, count = _walk(keys, graph, entries, queries[i], beam)
        scanned[i] = count
        for t in range(min(k, found.size)):
            ids[i, t] = found[t]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # the dot products vectorise
def _walk(keys, graph, entries, q, beam):
    """Best-first search: the pool holds the `beam` best keys seen, sorted; the best unexpanded one is expanded
    until every pooled key is. Returns the pool's ids (best first) and the inner products computed."""
    n, d = keys.shape
    visited = np.zeros(n, np.bool_)
    pool_id = np.full(beam, -1, np.int64)
    pool_score = np.full(beam, -np.inf, np.float32)
    expanded = np.zeros(beam, np.bool_)
    fresh = np.empty(max(graph.shape[1], entries.size), np.int64)
    scores = np.empty(fresh.size, np.float32)
    size = 0
    count = 0
    frontier = entries
    node = -1
    while True:
        # the frontier's unvisited keys scored first, apart from the pool's branches, so their loads overlap
        m = 0
        for c in frontier:
            if c >= 0 and not visited[c]:
                visited[c] = True
                fresh[m] = c
                m += 1
        for i in range(m):
            s = np.float32(0.0)
            for t in range(d):
                s += q[t] * keys[fresh[i], t]
            scores[i] = s
        count += m
        for i in range(m):
            s = scores[i]
            if size == beam and s <= pool_score[beam - 1]:
                continue
            at = size if size < beam else beam - 1
            while at > 0 and pool_score[at - 1] < s:  # shift worse entries down (the last one drops when full)
                pool_id[at] = pool_id[at - 1]
                pool_score[at] = pool_score[at - 1]
                expanded[at] = expanded[at - 1]
                at -= 1
            pool_id[at] = fresh[i]
            pool_score[at] = s
            expanded[at] = False
            if size < beam:
                size += 1
        node = -1
        for i in range(size):
            if not expanded[i]:
                expanded[i] = True
                node = pool_id[i]
                break
        if node < 0:
            break
        frontier = graph[node]
    return pool_id[:size], count
