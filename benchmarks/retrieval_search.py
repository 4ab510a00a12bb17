"""Host cost of one RetrievalAttention search: the graph index's beam search and the attention over what it
found, per query, on synthetic keys (queries drawn apart from the keys, as decode queries are).

    python -m benchmarks.retrieval_search [--keys 131072] [--dim 128] [--queries 64]

Prints the time to project the graph, the median time per search and the keys it scanned, and the time of the
attention over the found keys for a group of 4 query heads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from lcjax.methods.retrieval_index import QueryGraphIndex, exact_top_k
from lcjax.methods.retrieval_store import _attend_found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=131072)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--train-queries", type=int, default=2048)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    shift = np.r_[np.full(8, 3.0), np.zeros(a.dim - 8)]  # keys and queries apart along a few dimensions
    keys = (rng.normal(size=(a.keys, a.dim)) + shift).astype(np.float32)
    draw = lambda m: (rng.normal(size=(m, a.dim)) - shift).astype(np.float32)
    knn = exact_top_k(keys, draw(a.train_queries), 64)
    QueryGraphIndex(keys[:1024], None, knn=np.minimum(knn, 1023))  # compiles
    t0 = time.perf_counter()
    index = QueryGraphIndex(keys, None, knn=knn)
    build = time.perf_counter() - t0
    queries = draw(a.queries)
    index.search(queries[:1], 100)
    times, scanned = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, n = index.search(q[None], 100)
        times.append(time.perf_counter() - t0)
        scanned.append(int(n[0]))
    ids, _ = index.search(queries[:4], 100)
    values = rng.normal(size=keys.shape).astype(np.float32)
    out, lse = np.zeros((4, a.dim), np.float32), np.zeros(4, np.float32)
    _attend_found(keys, values, False, ids, queries[:4], np.float32(0.1), out, lse)
    t0 = time.perf_counter()
    for _ in range(100):
        _attend_found(keys, values, False, ids, queries[:4], np.float32(0.1), out, lse)
    attend = (time.perf_counter() - t0) / 100
    print(f"{a.keys} keys x {a.dim}: graph projected in {build:.2f} s; search {statistics.median(times) * 1e3:.3f} ms "
          f"median, {statistics.median(scanned)} keys scanned ({statistics.median(scanned) / a.keys:.1%}); "
          f"attention over 100 found keys, 4 heads: {attend * 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
