"""Quest page selection (lcjax.methods.quest_pages) against float64 numpy references written here: page
bounds on ragged lengths and ragged capacities, incremental bounds == recomputed bounds, the score really
upper-bounds every valid q.k, top-k selection with the current page forced in, and decode attention equal
to dense attention under a full budget and to attention restricted to the reference's pages otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.methods.quest_pages import (
    num_valid_pages,
    page_bounds,
    page_scores,
    quest_decode_attention,
    select_pages,
    update_page_bounds,
)

bounds_jit = jax.jit(page_bounds, static_argnames="page_size")
update_jit = jax.jit(update_page_bounds, static_argnames="page_size")
select_jit = jax.jit(select_pages, static_argnames=("token_budget", "page_size"))
attend_jit = jax.jit(quest_decode_attention, static_argnames=("scale", "token_budget", "page_size"))


def with_garbage(k, lengths):
    """Slots >= length hold NaN: any read of them shows up in the result."""
    k = np.array(k, np.float32)
    for b, n in enumerate(lengths):
        k[b, n:] = np.nan
    return k


def np_bounds(k, lengths, ps):
    """Loops over pages; empty pages +inf / -inf."""
    batch, cap, kvh, d = k.shape
    pages = -(-cap // ps)
    kmin = np.full((batch, pages, kvh, d), np.inf)
    kmax = np.full((batch, pages, kvh, d), -np.inf)
    for b in range(batch):
        for p in range(pages):
            keys = np.asarray(k[b, p * ps : min((p + 1) * ps, lengths[b])], np.float64)
            if len(keys):
                kmin[b, p], kmax[b, p] = keys.min(0), keys.max(0)
    return kmin, kmax


def np_scores(q, kmin, kmax, lengths, ps):
    """sum_c max(q_c * kmin_c, q_c * kmax_c), max over each KV head's query group; -inf past the length."""
    q = np.asarray(q, np.float64)
    batch, heads, _ = q.shape
    pages, kvh = kmin.shape[1:3]
    group = heads // kvh
    out = np.full((batch, kvh, pages), -np.inf)
    for b in range(batch):
        for p in range(-(-lengths[b] // ps)):
            for h in range(kvh):
                out[b, h, p] = max(
                    np.maximum(q[b, hq] * kmin[b, p, h], q[b, hq] * kmax[b, p, h]).sum()
                    for hq in range(h * group, (h + 1) * group)
                )
    return out


def np_select(scores, n_sel, ps, lengths):
    """Per (batch, kv head): the current page, then the best other valid pages up to n_sel in all."""
    batch, kvh, _ = scores.shape
    chosen = {}
    for b in range(batch):
        live = list(range(-(-lengths[b] // ps)))
        for h in range(kvh):
            if not live:
                chosen[b, h] = set()
                continue
            cur = (lengths[b] - 1) // ps
            rest = sorted((p for p in live if p != cur), key=lambda p: -scores[b, h, p])
            chosen[b, h] = {cur, *rest[: n_sel - 1]}
    return chosen


def np_attention(q, k, v, allowed, scale):
    """float64 softmax attention of one decode query; allowed bool `[batch, kv_heads, capacity]`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, heads, d))
    for b in range(batch):
        for hq in range(heads):
            m = allowed[b, hq // group]
            if m.any():
                s = k[b, m, hq // group] @ q[b, hq] * scale
                p = np.exp(s - s.max())
                out[b, hq] = p / p.sum() @ v[b, m, hq // group]
    return out


def test_page_bounds_ragged():
    rng = np.random.default_rng(0)
    lengths = np.array([37, 13, 16, 0], np.int32)
    k = with_garbage(rng.standard_normal((4, 37, 2, 5)), lengths)  # 37 slots: last page of 8 is ragged
    kmin, kmax = bounds_jit(jnp.asarray(k), jnp.asarray(lengths), page_size=8)
    ref_min, ref_max = np_bounds(k, lengths, 8)
    assert kmin.shape == kmax.shape == (4, 5, 2, 5) and kmin.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kmin), ref_min)
    np.testing.assert_array_equal(np.asarray(kmax), ref_max)

    # bf16 keys: bounds of the same values, in fp32.
    kb = jnp.asarray(k, jnp.bfloat16)
    ref_min, ref_max = np_bounds(np.asarray(kb.astype(jnp.float32)), lengths, 8)
    kmin, kmax = bounds_jit(kb, jnp.asarray(lengths), page_size=8)
    np.testing.assert_array_equal(np.asarray(kmin), ref_min)
    np.testing.assert_array_equal(np.asarray(kmax), ref_max)


def test_incremental_update_equals_recompute():
    rng = np.random.default_rng(1)
    ps, cap = 8, 44  # ragged capacity; lengths cross page boundaries and reach the capacity
    lengths = np.array([5, 16, 0], np.int32)
    k = with_garbage(rng.standard_normal((3, cap, 2, 4)), lengths)
    kmin, kmax = bounds_jit(jnp.asarray(k), jnp.asarray(lengths), page_size=ps)
    for step in range(30):
        # Decode appends one token per active sequence; paused sequences pad their write (slot = length,
        # lengths_after unchanged) and carry NaN, which must be ignored.
        active = (rng.random(3) < 0.8) & (lengths < cap)
        slots = np.minimum(lengths, cap - 1)[:, None].astype(np.int32)
        k_new = rng.standard_normal((3, 1, 2, 4)).astype(np.float32)
        k_new[~active] = np.nan
        lengths = lengths + active
        k[active, slots[active, 0]] = k_new[active, 0]
        kmin, kmax = update_jit(kmin, kmax, jnp.asarray(k_new), jnp.asarray(slots), jnp.asarray(lengths), page_size=ps)
        ref_min, ref_max = np_bounds(k, lengths, ps)
        np.testing.assert_array_equal(np.asarray(kmin), ref_min, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(kmax), ref_max, err_msg=f"step {step}")

    # A multi-token append spanning pages, one of its writes past the new length (ignored).
    lengths = np.array([10, 3, 0], np.int32)
    k = with_garbage(rng.standard_normal((3, cap, 2, 4)), lengths)
    kmin, kmax = bounds_jit(jnp.asarray(k), jnp.asarray(lengths), page_size=ps)
    slots = np.array([[10, 11, 12, 13, 14, 15, 16, 17], [3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 7]], np.int32)
    after = np.array([18, 11, 5], np.int32)
    k_new = rng.standard_normal((3, 8, 2, 4)).astype(np.float32)
    for b in range(3):
        for i, s in enumerate(slots[b]):
            if s < after[b]:
                k[b, s] = k_new[b, i]
    kmin, kmax = update_jit(kmin, kmax, jnp.asarray(k_new), jnp.asarray(slots), jnp.asarray(after), page_size=ps)
    ref_min, ref_max = np_bounds(k, after, ps)
    np.testing.assert_array_equal(np.asarray(kmin), ref_min)
    np.testing.assert_array_equal(np.asarray(kmax), ref_max)


def test_scores_upper_bound_every_valid_key():
    rng = np.random.default_rng(2)
    ps, group = 8, 3
    lengths = np.array([50, 29], np.int32)
    k = with_garbage(rng.standard_normal((2, 50, 2, 8)) * rng.uniform(0.2, 3.0, (1, 1, 1, 8)), lengths)
    q = rng.standard_normal((2, 2 * group, 8)).astype(np.float32)
    kmin, kmax = bounds_jit(jnp.asarray(k), jnp.asarray(lengths), page_size=ps)
    scores = np.asarray(jax.jit(page_scores)(jnp.asarray(q), kmin, kmax, num_valid_pages(jnp.asarray(lengths), ps)))
    ref = np_scores(q, *np_bounds(k, lengths, ps), lengths, ps)
    assert scores.shape == (2, 2, 7)
    assert np.array_equal(np.isinf(scores), np.isinf(ref)) and (scores[np.isinf(scores)] < 0).all()
    live = np.isfinite(ref)
    np.testing.assert_allclose(scores[live], ref[live], rtol=1e-5, atol=1e-5)
    for b in range(2):
        for j in range(lengths[b]):
            for hq in range(2 * group):
                dot = np.dot(q[b, hq].astype(np.float64), k[b, j, hq // group].astype(np.float64))
                assert dot <= scores[b, hq // group, j // ps] + 1e-5 * (1 + abs(dot)), (b, j, hq)


def test_select_pages_planted_scores():
    rng = np.random.default_rng(3)
    ps, n_pages = 4, 10
    lengths = np.array([40, 23, 5, 0, 37], np.int32)
    # Distinct scores everywhere, pages past the length included (select_pages must mask them itself).
    scores = rng.permutation(5 * 2 * n_pages).reshape(5, 2, n_pages).astype(np.float32)
    scores[4, :, 9] = -1.0  # sequence 4: its current page scores lowest and must still be kept
    pages, valid = select_jit(jnp.asarray(scores), token_budget=16, page_size=ps, lengths=jnp.asarray(lengths))
    pages, valid = np.asarray(pages), np.asarray(valid)
    assert pages.shape == valid.shape == (5, 2, 4) and pages.dtype == np.int32
    assert ((pages >= 0) & (pages < n_pages)).all()
    ref = np_select(scores, 4, ps, lengths)
    for b in range(5):
        for h in range(2):
            got = pages[b, h][valid[b, h]]
            assert len(set(got)) == len(got) == min(4, -(-lengths[b] // ps))
            assert set(got) == ref[b, h], (b, h)
            if lengths[b]:
                assert pages[b, h, 0] == (lengths[b] - 1) // ps and valid[b, h, 0]

    # A budget past the cache is capped at its page count; partial pages are refused.
    pages, valid = select_jit(jnp.asarray(scores), token_budget=64, page_size=ps, lengths=jnp.asarray(lengths))
    assert pages.shape == (5, 2, n_pages)
    assert (np.asarray(valid).sum(-1) == [[10, 10], [6, 6], [2, 2], [0, 0], [10, 10]]).all()
    with pytest.raises(ValueError):
        select_pages(jnp.asarray(scores), 18, ps, jnp.asarray(lengths))


def causal_mask(lengths, cap, kvh):
    return np.broadcast_to((np.arange(cap)[None, :] < np.asarray(lengths)[:, None])[:, None], (len(lengths), kvh, cap))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_full_budget_is_dense(dtype):
    rng = np.random.default_rng(4)
    ps, cap, d = 8, 100, 16  # ragged capacity: 13 pages, the last one 4 slots long
    lengths = np.array([100, 61, 1, 0], np.int32)
    q = jnp.asarray(rng.standard_normal((4, 4, d)), dtype)
    k = jnp.asarray(with_garbage(rng.standard_normal((4, cap, 2, d)), lengths), dtype)
    v = jnp.asarray(with_garbage(rng.standard_normal((4, cap, 2, d)), lengths), dtype)
    kmin, kmax = bounds_jit(k, jnp.asarray(lengths), page_size=ps)
    f32 = [np.asarray(x.astype(jnp.float32)) for x in (q, k, v)]
    ref = np_attention(*f32, causal_mask(lengths, cap, 2), 0.25)
    tol = 2e-5 if dtype == jnp.float32 else 1.5e-2
    for budget in (104, 256):  # exactly every page, and more than the cache
        out = attend_jit(q, k, v, jnp.asarray(lengths), kmin, kmax, scale=0.25, token_budget=budget, page_size=ps)
        out = np.asarray(out.astype(jnp.float32), np.float64)
        assert out.shape == (4, 4, d) and np.isfinite(out).all() and (out[3] == 0).all()
        assert np.abs(out - ref).max() < tol * 4 * np.abs(ref).max()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol


def test_sparse_budget_planted_needles():
    rng = np.random.default_rng(5)
    ps, cap, d, group, scale = 8, 104, 16, 2, 0.02
    lengths = np.array([100, 61], np.int32)
    q = rng.standard_normal((2, 2 * group, d)).astype(np.float32)
    k = rng.standard_normal((2, cap, 2, d)).astype(np.float32)
    v = rng.standard_normal((2, cap, 2, d)).astype(np.float32)
    # Needle pages per (batch, kv head): one key aligned with a query of the group, far above any
    # random page's bound. Sequence 1 head 0 leaves a budget slot to the ordinary ranking.
    needles = {(0, 0): {2, 7, 9}, (0, 1): {0, 5, 11}, (1, 0): {1, 4}, (1, 1): {3, 5, 6}}
    for (b, h), pages in needles.items():
        for i, p in enumerate(sorted(pages)):
            qn = q[b, h * group + i % group]
            k[b, p * ps + (3 * i) % ps, h] = 20 * qn / np.linalg.norm(qn)
    k, v = with_garbage(k, lengths), with_garbage(v, lengths)

    ref_scores = np_scores(q, *np_bounds(k, lengths, ps), lengths, ps)
    chosen = np_select(ref_scores, 4, ps, lengths)
    allowed = np.zeros((2, 2, cap), bool)
    for (b, h), pages in chosen.items():
        assert needles[b, h] <= pages and (lengths[b] - 1) // ps in pages
        rest = sorted((ref_scores[b, h, p] for p in range(-(-lengths[b] // ps)) if p not in pages), reverse=True)
        picked = min(ref_scores[b, h, p] for p in pages - {(lengths[b] - 1) // ps})
        assert picked - rest[0] > 1e-3 * abs(picked)  # the reference's choice is not a near-tie
        for p in pages:
            allowed[b, h, p * ps : min((p + 1) * ps, lengths[b])] = True

    jq, jk, jv, jl = (jnp.asarray(x) for x in (q, k, v, lengths))
    kmin, kmax = bounds_jit(jk, jl, page_size=ps)
    pages, valid = select_jit(
        page_scores(jq, kmin, kmax, num_valid_pages(jl, ps)), token_budget=32, page_size=ps, lengths=jl
    )
    for (b, h), want in chosen.items():
        assert set(np.asarray(pages)[b, h][np.asarray(valid)[b, h]]) == want

    out = np.asarray(attend_jit(jq, jk, jv, jl, kmin, kmax, scale=scale, token_budget=32, page_size=ps))
    ref = np_attention(q, k, v, allowed, scale)
    dense = np_attention(q, k, v, causal_mask(lengths, cap, 2), scale)
    assert np.linalg.norm(dense - ref) / np.linalg.norm(ref) > 0.1  # the restriction matters
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-5
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


def test_first_slot_is_honoured():
    """A compressed layer's valid slots start at `first`: pages wholly before it are never bounded or chosen,
    slots before it in a straddling page are never attended (they hold NaN here), and with a full budget the
    result is dense attention over [first, length)."""
    rng = np.random.default_rng(6)
    ps, cap, d = 8, 64, 16
    lengths, first = np.array([60, 40], np.int32), np.array([19, 0], np.int32)
    k = with_garbage(rng.standard_normal((2, cap, 2, d)), lengths)
    v = with_garbage(rng.standard_normal((2, cap, 2, d)), lengths)
    k[0, :19], v[0, :19] = np.nan, np.nan
    q = rng.standard_normal((2, 4, d)).astype(np.float32)
    jk, jl, jf = jnp.asarray(k), jnp.asarray(lengths), jnp.asarray(first)
    kmin, kmax = jax.jit(page_bounds, static_argnames="page_size")(jk, jl, page_size=ps, first=jf)
    ref_min, ref_max = np_bounds(np.where(np.isnan(k), np.inf, k), lengths, ps)  # NaN-free copy for numpy
    ref_min[0, :2], ref_max[0, :2] = np.inf, -np.inf  # pages 0-1: before first
    keys = np.asarray(k[0, 19:24], np.float64)  # page 2 starts at slot 16
    ref_min[0, 2], ref_max[0, 2] = keys.min(0), keys.max(0)
    np.testing.assert_array_equal(np.asarray(kmin), ref_min)
    np.testing.assert_array_equal(np.asarray(kmax), ref_max)
    allowed = causal_mask(lengths, cap, 2) & (np.arange(cap)[None, None, :] >= first[:, None, None])
    ref = np_attention(q, np.nan_to_num(k), np.nan_to_num(v), allowed, 0.25)
    for budget in (64, 24):
        out = np.asarray(
            jax.jit(quest_decode_attention, static_argnames=("scale", "token_budget", "page_size"))(
                jnp.asarray(q),
                jk,
                jnp.asarray(v),
                jl,
                kmin,
                kmax,
                scale=0.25,
                token_budget=budget,
                page_size=ps,
                first=jf,
            )
        )
        assert np.isfinite(out).all()
        pages, valid = select_jit(
            page_scores(jnp.asarray(q), kmin, kmax, num_valid_pages(jl, ps)),
            token_budget=budget,
            page_size=ps,
            lengths=jl,
            first=jf,
        )
        assert (np.asarray(pages)[0][np.asarray(valid)[0]] >= 2).all()  # never a page before first
        if budget == 64:
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-5
