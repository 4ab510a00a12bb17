"""RetrievalAttention inside the model: with retrieval that reaches every host key it equals dense attention
(tokens and the cache's logical contents) through prefill, decode, later turns, forks and crops; the merge of
window and host attention equals attention over their union (float64); keys of a later turn are found; the
GPU cache shrinks to the window; bad settings fail clearly."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import prompt_of
from ml_dtypes import bfloat16

from lcjax.cache import cache_nbytes
from lcjax.generate import generate
from lcjax.methods.retrieval_attention import RetrievalAttention, RetrievalCache, merge_attention, window_attention
from lcjax.methods.retrieval_store import HostStore, IndexSettings


def exact(index="flat", **kw):
    """Retrieval reaching every host key: the model must then match dense attention."""
    return RetrievalAttention(sink=4, recent=8, top_k=10_000, index=index, train_queries=16, **kw)


def assert_same_contents(cache: RetrievalCache, dense, rows=None):
    """Every valid logical slot of every layer holds the dense cache's key and value (to float32 rounding: tokens
    decoded through the merged attention differ from dense in the last bits)."""
    lengths = np.asarray(cache.lengths)
    np.testing.assert_array_equal(lengths, np.asarray(dense.lengths))
    for layer in range(cache.first.shape[0]):
        (k, v), (dk, dv) = cache.layer_kv(layer), dense.layer_kv(layer)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(k)[b, :n], np.asarray(dk)[b, :n], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(v)[b, :n], np.asarray(dv)[b, :n], rtol=1e-4, atol=1e-5)


def test_exact_retrieval_equals_dense_through_turns(llama):
    """The graph index (the flat one is exact by construction and runs in the tests below)."""
    prompt, turn2 = prompt_of(llama, 1, (2, 40)), prompt_of(llama, 2, (2, 9))
    method = exact("graph")
    ra = llama.with_transforms(cache_transform=method)
    a, ca = generate(llama, prompt, 6)
    b, cb = generate(ra, prompt, 6)
    assert isinstance(cb, RetrievalCache) and a == b
    assert (np.asarray(cb.host_len) == 40 - 4 - 8).all() and cb.slots < ca.capacity
    assert_same_contents(cb, ca)
    a2, ca2 = generate(llama, turn2, 5, cache=ca)
    b2, cb2 = generate(ra, turn2, 5, cache=cb)
    assert a2 == b2
    assert_same_contents(cb2, ca2)
    assert (np.asarray(cb2.host_len) > np.asarray(cb.host_len)).all()  # the first turn's answer moved too
    fa, fb = ca2.fork(2), cb2.fork(2)
    assert (
        generate(llama, prompt_of(llama, 3, (4, 3)), 3, cache=fa)[0]
        == generate(ra, prompt_of(llama, 3, (4, 3)), 3, cache=fb)[0]
    )
    for cut in (50, 20, 3):  # inside the window, inside the host part, inside the sink
        assert_same_contents(cb2.crop(cut), ca2.crop(cut))
    assert method.store.nbytes() > 0 and cb2.host_nbytes() > 0


def test_ragged_rows_and_batch_chunks_equal_dense(llama):
    """Rows of different lengths move different numbers of tokens; prefilling them in groups writes each group's
    window and host ids into the batch's cache."""
    prompt, lengths = prompt_of(llama, 12, (3, 37)), np.array([37, 15, 30])
    ra = llama.with_transforms(cache_transform=exact())
    a, ca = generate(llama, prompt, 5, lengths=lengths)
    b, cb = generate(ra, prompt, 5, lengths=lengths)
    assert a == b and list(np.asarray(cb.host_len)) == [37 - 12, 15 - 12, 30 - 12]
    assert_same_contents(cb, ca)
    _, chunked = ra.prefill(prompt, lengths, capacity=48, batch_chunk=2)
    _, dense = llama.prefill(prompt, lengths, capacity=48)
    assert_same_contents(chunked, dense)


def test_gpu_cache_keeps_the_window_only(llama):
    prompt = prompt_of(llama, 4, (1, 240))
    _, dense = llama.prefill(prompt, capacity=250)
    _, cache = llama.with_transforms(cache_transform=exact()).prefill(prompt, capacity=250)
    assert cache.slots == 4 + 8 + 10 and cache.capacity >= 250
    assert cache_nbytes(cache) < cache_nbytes(dense) / 10


def test_small_top_k_reads_less_and_changes_tokens(llama):
    """Retrieving 2 of 28 host keys must change what the model sees (the retrieval is really applied)."""
    prompt = prompt_of(llama, 5, (2, 40))
    dense, _ = generate(llama, prompt, 6)
    few, _ = generate(llama.with_transforms(cache_transform=RetrievalAttention(4, 8, top_k=2, index="flat")), prompt, 6)
    assert few != dense


def test_merged_window_and_host_attention_equal_attention_over_the_union():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 4, 8))
    k, v = rng.normal(size=(2, 12, 2, 8)), rng.normal(size=(2, 12, 2, 8))
    lo, hi = np.array([0, 2]), np.array([5, 12])
    split = np.array([3, 7])  # slots before it are "window", the rest "host"
    scale = 8**-0.5
    out_a, lse_a = window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lo),
                                    jnp.asarray(np.minimum(split, hi)), scale)  # fmt: skip
    out_b, lse_b = window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(np.maximum(split, lo)),
                                    jnp.asarray(hi), scale)  # fmt: skip
    got = np.asarray(merge_attention(out_a, lse_a, out_b, lse_b))
    for b in range(2):
        for h in range(4):
            kk, vv = k[b, lo[b] : hi[b], h // 2], v[b, lo[b] : hi[b], h // 2]
            s = kk @ q[b, h] * scale
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[b, h], p @ vv / p.sum(), rtol=1e-5, atol=1e-6)
    empty = window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(hi), jnp.asarray(hi), scale)
    assert np.isneginf(np.asarray(empty[1])).all()
    np.testing.assert_allclose(np.asarray(merge_attention(out_a, lse_a, *empty)), np.asarray(out_a), rtol=1e-6)


def test_a_key_added_in_a_later_turn_is_retrieved(llama):
    """A graph index with a small top_k finds, in the second turn's host part, the key a query matches exactly."""
    method = RetrievalAttention(sink=2, recent=4, top_k=3, index="graph", train_queries=8)
    ra = llama.with_transforms(cache_transform=method)
    _, cache = ra.prefill(prompt_of(llama, 6, (1, 30)), capacity=60)
    _, cache = ra.extend(prompt_of(llama, 7, (1, 20)), cache)
    sid = int(cache.store_id[0])
    entry = method.store.entry(sid)
    assert entry.size == int(cache.host_len[0]) == 30 + 20 - 2 - 4
    keys = entry.keys[1][0]  # layer 1, KV head 0
    for target in (entry.size - 3, entry.size - 10):  # tokens of the second turn
        found, _ = entry.indexes[1][0].search(keys[target][None] * 50.0, 3)
        assert target in found[0]


def test_bad_settings_name_the_problem(llama):
    with pytest.raises(ValueError, match="top_k >= 1"):
        RetrievalAttention(top_k=0)
    with pytest.raises(ValueError, match="recent >= 1"):
        RetrievalAttention(recent=0)
    with pytest.raises(ValueError, match="index must be"):
        RetrievalAttention(index="lsh")
    method = exact()
    _, cache = llama.with_transforms(cache_transform=method).prefill(prompt_of(llama, 8, (1, 30)))
    method.store.release(np.asarray(cache.store_id))
    with pytest.raises(Exception, match="was released"):
        generate(llama.with_transforms(cache_transform=method), prompt_of(llama, 9, (1, 2)), 2, cache=cache)


def test_composes_with_sparse_prefill(llama):
    """MInference prefill + retrieval decode in one line: with retrieval reaching every host key, the tokens equal
    MInference with the dense cache."""
    from lcjax.methods import MInference

    c = llama.config
    sparse = llama.with_transforms(attention=MInference.vertical_slash(c.num_layers, c.num_heads, 8, 16))
    both = sparse.with_transforms(cache_transform=exact())
    prompt = prompt_of(llama, 13, (1, 40))
    a, _ = generate(sparse, prompt, 5)
    b, cache = generate(both, prompt, 5)
    assert a == b and isinstance(cache, RetrievalCache)


def test_a_later_turn_gets_physical_room_and_short_windows_index(llama):
    """A second turn longer than the GPU window's free slots makes generate grow the window (the logical capacity
    alone would have let its tokens fall off the end), and a graph index over fewer than four leaving tokens is
    built (flat below two)."""
    prompt, turn2 = prompt_of(llama, 14, (1, 40)), prompt_of(llama, 15, (1, 25))
    ra = llama.with_transforms(cache_transform=exact("graph"))
    a, ca = generate(llama, prompt, 6, capacity=64)
    b, cb = generate(ra, prompt, 6, capacity=64)
    assert a == b and cb.slots_needed(30) > cb.capacity  # the window has no room for 25 + 5 tokens
    a2, ca2 = generate(llama, turn2, 5, cache=ca)
    b2, cb2 = generate(ra, turn2, 5, cache=cb)
    assert a2 == b2
    assert_same_contents(cb2, ca2)
    short = llama.with_transforms(cache_transform=exact("graph"))
    for n in (14, 15):  # 2 and 3 tokens leave a window of 12
        assert generate(short, prompt[:, :n], 1, capacity=n + 1)[0] == generate(llama, prompt[:, :n], 1)[0]


def test_an_append_looks_up_every_parent_before_dropping_old_entries(llama):
    """Two rows with their own parents: adding the first row's new entry drops the oldest entries, the second row's
    parent among them, but every parent was read before (the call does not fail)."""
    method = RetrievalAttention(sink=4, recent=8, top_k=10_000, index="flat", train_queries=16)
    ra = llama.with_transforms(cache_transform=method)
    _, cache = ra.prefill(prompt_of(llama, 16, (2, 40)), capacity=60)
    method.store.max_bytes = method.store.nbytes()  # any new entry drops the oldest
    _, after = ra.extend(prompt_of(llama, 17, (2, 20)), cache)
    assert method.store.entry(int(after.store_id[1])).size == 40 + 20 - 12


@pytest.mark.parametrize("threads", [1, 16])  # one task per KV head, or per query head
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_host_attention_equals_float64_attention_over_the_top_keys(dtype, threads):
    """HostStore.attend over an exact index: each query head's softmax over its top_k keys, with values kept in
    the model's dtype (bfloat16 read by its bits), against float64 NumPy; a row with no host part gets -inf."""
    rng = np.random.default_rng(3)
    layers, slots, kv_heads, group, d, top_k = 2, 50, 2, 3, 16, 7
    dtype = bfloat16 if dtype == "bfloat16" else dtype
    keys = rng.normal(size=(layers, 2, slots, kv_heads, d)).astype(np.float32)
    values = rng.normal(size=(layers, 2, slots, kv_heads, d)).astype(dtype)
    store = HostStore(threads=threads)
    ids = store.append(
        np.zeros(2, np.int32), np.array([slots, 0]), keys, values, np.zeros((layers, 2, 1, kv_heads * group, d)),
        np.ones((2, 1), bool), np.zeros((layers, 2, kv_heads, group, 2), np.int32), IndexSettings("flat"),
    )  # fmt: skip
    assert ids[0] > 0 and ids[1] == 0
    q = rng.normal(size=(2, kv_heads * group, d)).astype(np.float32)
    out, lse = store.attend(ids, 1, q, top_k, 0.3)
    for h in range(kv_heads * group):
        k64, v64 = keys[1, 0, :, h // group].astype(np.float64), values[1, 0, :, h // group].astype(np.float64)
        s = k64 @ q[0, h] * 0.3
        top = np.argsort(-s)[:top_k]
        m = s[top].max()
        p = np.exp(s[top] - m)
        np.testing.assert_allclose(out[0, h], p @ v64[top] / p.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse[0, h], m + np.log(p.sum()), rtol=1e-6)
    assert np.isneginf(lse[1]).all() and not out[1].any()
