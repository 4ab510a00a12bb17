"""RetrievalAttention's key indexes: exact search against float64 numpy, the query-built graph's recall on planted
out-of-distribution queries (high recall while scanning a small share, where the keys alone mislead IVF), the
graph's shape, and bad settings."""

import numpy as np
import pytest

from lcjax.methods.retrieval_index import FaissIndex, FlatIndex, QueryGraphIndex, exact_top_k


def planted(seed=0, groups=40, per_group=25, background=3000, d=32, train=30, test=4):
    """Keys in clusters around group directions plus background keys; queries point along a group's direction
    from a shared offset, so they lie away from the keys (out of their distribution) and a query's top keys
    are mostly its group's."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(groups, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    keys = [dirs[g] * 3 + rng.normal(scale=0.6, size=(per_group, d)) for g in range(groups)]
    keys.append(rng.normal(size=(background, d)))
    keys = np.concatenate(keys).astype(np.float32)
    keys = keys[rng.permutation(len(keys))]
    offset = rng.normal(size=d) * 2  # every query shares it: queries lie away from the keys

    def queries(n):
        g = rng.integers(0, groups, n)
        return (dirs[g] * 4 + offset + rng.normal(scale=0.5, size=(n, d))).astype(np.float32)

    return keys, queries(groups * train), queries(groups * test)


def recall(ids, truth):
    return np.mean([len(np.intersect1d(a[a >= 0], b)) / len(b) for a, b in zip(ids, truth)])


def test_flat_search_is_exact_against_float64():
    rng = np.random.default_rng(1)
    keys, queries = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)
    ids, scanned = FlatIndex(keys).search(queries, 10)
    want = np.argsort(-(queries.astype(np.float64) @ keys.astype(np.float64).T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, want)
    assert (scanned == 500).all()
    ids, _ = FlatIndex(keys[:4]).search(queries, 6)  # fewer keys than asked: the rest -1
    assert (ids[:, 4:] == -1).all() and (np.sort(ids[:, :4], 1) == np.arange(4)).all()


def test_query_graph_finds_planted_top_keys_scanning_a_small_share():
    keys, train, test = planted()
    truth = exact_top_k(keys, test, 20)
    graph = QueryGraphIndex(keys, train, per_query=32, degree=32)
    ids, scanned = graph.search(test, 20, beam=64)
    assert recall(ids, truth) >= 0.97
    assert scanned.mean() / len(keys) <= 0.1
    ivf, ivf_scanned = FaissIndex(keys, "ivf", probes=16).search(test, 20)  # built from the keys alone
    assert ivf_scanned.mean() > scanned.mean() and recall(ivf, truth) < 0.9
    scores = np.take_along_axis(test @ keys.T, ids, axis=1)
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    wider, more = graph.search(test, 20, beam=256)
    assert recall(wider, truth) >= recall(ids, truth) and more.mean() > scanned.mean()


def test_faiss_indexes_return_inner_product_neighbours():
    keys, _, test = planted(seed=2)
    truth = exact_top_k(keys, test, 10)
    for index in (FaissIndex(keys, "ivf", probes=1000), FaissIndex(keys, "hnsw", ef=2000)):
        ids, scanned = index.search(test, 10)
        assert recall(ids, truth) >= 0.99 and (scanned > 0).all()
    few, scanned_few = FaissIndex(keys, "ivf", probes=1).search(test, 10)
    assert scanned_few.mean() < 0.2 * len(keys)


def test_graph_links_every_key_and_keeps_its_degree():
    keys, train, _ = planted(seed=3)
    graph = QueryGraphIndex(keys, train, per_query=16, degree=8)
    assert graph.graph.shape == (len(keys), 10)
    for p in (0, 1, len(keys) // 2, len(keys) - 1):
        row = graph.graph[p][graph.graph[p] >= 0]
        assert p not in row and len(set(row)) == len(row)
        assert {p - 1, p + 1} & set(range(len(keys))) <= set(row)  # sequence links


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(per_query=1), "per_query >= 2"), (dict(pivots=0), "pivots"), (dict(beam=0), "beam"),
     (dict(knn=np.zeros((3, 64), np.int64)), "knn must be")],
)  # fmt: skip
def test_bad_settings_name_the_problem(kwargs, match):
    keys, train, _ = planted(groups=4, background=100)
    with pytest.raises(ValueError, match=match):
        QueryGraphIndex(keys, train, **kwargs)
    with pytest.raises(ValueError, match="k must be"):
        FlatIndex(keys).search(train, 0)
    with pytest.raises(ValueError, match=r"queries must be \[m, 32\]"):
        FlatIndex(keys).search(train[:, :5], 3)
    with pytest.raises(ValueError, match="non-empty"):
        FlatIndex(np.zeros((0, 32)))
    with pytest.raises(ValueError, match="kind"):
        FaissIndex(keys, "lsh")
