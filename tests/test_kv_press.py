"""KV presses (StreamingLLM, SnapKV, PyramidKV) against float64 numpy references, and their use in the model.

The references are written here from the papers' descriptions: SnapKV's votes (softmax of the observation
window's queries over the cache, causal, averaged over the window and the GQA group), average pooling with zero
padding, the window always kept, top budget per KV head; StreamingLLM's sinks + recent; PyramidKV's budgets.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

import lcjax
from lcjax.cache import KVCache, Observation, observe_rows
from lcjax.generate import generate
from lcjax.methods import kv_press
from lcjax.methods.knorm import KnormPress
from lcjax.methods.pyramidkv import PyramidKVPress, kvpress_budgets
from lcjax.methods.snapkv import SnapKVPress
from lcjax.methods.streaming_llm import StreamingLLMPress
from lcjax.methods.tova import TOVAPress

LAYERS, BATCH, CAP, KVH, HEADS, D, WINDOW = 2, 2, 96, 2, 4, 16, 4


def snap_votes_f64(q, k, q_slots, q_valid, lengths, kernel, scale):
    """numpy float64 SnapKV votes, pooled over the slots before the window (whose votes become 0).
    q `[b, w, heads, d]`, k `[b, cap, kvh, d]` -> `[b, kvh, cap]`."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b_, w, heads, _ = q.shape
    cap, kvh = k.shape[1], k.shape[2]
    g = heads // kvh
    votes = np.zeros((b_, kvh, cap))
    for b in range(b_):
        n_obs = max(int(q_valid[b].sum()), 1)
        for h in range(heads):
            for i in range(w):
                if not q_valid[b, i]:
                    continue
                allowed = (np.arange(cap) < lengths[b]) & (np.arange(cap) <= q_slots[b, i])
                s = np.where(allowed, k[b, :, h // g] @ q[b, i, h] * scale, -np.inf)
                p = np.exp(s - s.max())
                votes[b, h // g] += p / p.sum() / (n_obs * g)
        votes[b, :, max(int(lengths[b]) - w, 0) :] = 0.0  # pooled over the tokens before the window
    pad = kernel // 2
    padded = np.pad(votes, [(0, 0), (0, 0), (pad, kernel - 1 - pad)])
    return np.stack([padded[..., i : i + cap] for i in range(kernel)]).sum(0) / kernel


def kept_slots_f64(scores, lengths, window, budget):
    """numpy: per (b, kv head) the set of slots kept: the last `window` valid slots, then the best scores."""
    out = {}
    for b in range(scores.shape[0]):
        n = int(lengths[b])
        for h in range(scores.shape[1]):
            forced = set(range(max(n - window, 0), n))
            rest = [s for s in np.argsort(-scores[b, h, :n], kind="stable") if s not in forced]
            out[b, h] = forced | set(rest[: max(min(budget, n) - len(forced), 0)])
    return out


def planted_case(rng, stacked: bool):
    """A cache whose window queries point hard at a few 'needle' keys spaced apart (so pooled neighbourhoods do
    not overlap), random elsewhere; returns the cache, its observation and the needle slots."""
    lengths = np.array([CAP, 70])
    k = rng.standard_normal((LAYERS, BATCH, CAP, KVH, D)).astype(np.float32) * 0.3
    q = rng.standard_normal((LAYERS, BATCH, WINDOW, HEADS, D)).astype(np.float32) * 0.3
    needles = {b: rng.choice(np.arange(4, int(lengths[b]) - WINDOW - 4, 8), 3, replace=False) for b in range(BATCH)}
    direction = rng.standard_normal(D).astype(np.float32)
    direction /= np.linalg.norm(direction)
    q += 3.0 * direction
    for b, slots in needles.items():
        k[:, b, slots] += 4.0 * direction
    v = rng.standard_normal(k.shape).astype(np.float32)
    start = lengths - WINDOW
    _, slots, valid = observe_rows(jnp.asarray(start, jnp.int32), jnp.asarray(lengths, jnp.int32), WINDOW)
    first = jnp.zeros((LAYERS, BATCH), jnp.int32)
    kk, vv = jnp.asarray(k), jnp.asarray(v)
    if not stacked:
        kk, vv = tuple(kk), tuple(vv)
    cache = KVCache(kk, vv, jnp.asarray(lengths, jnp.int32), jnp.asarray(lengths + 5, jnp.int32), first)
    return cache, Observation(jnp.asarray(q), slots, valid), needles, (k, v, q, lengths)


def cache_sets(cache, k_full, layer):
    """The set of original slots each (b, h) kept, identified by matching key vectors."""
    k_new = np.asarray(cache.k[layer])
    lengths, first = np.asarray(cache.lengths), np.asarray(cache.first[layer])
    out = {}
    for b in range(k_new.shape[0]):
        for h in range(k_new.shape[2]):
            kept = k_new[b, first[b] : lengths[b], h]
            match = (kept[:, None, :] == k_full[layer, b][None, :, h, :]).all(-1)
            assert (match.sum(1) == 1).all()
            slots = match.argmax(1)
            assert (np.diff(slots) > 0).all()  # kept in their original order
            out[b, h] = set(slots.tolist())
    return out


def test_snapkv_votes_match_float64():
    rng = np.random.default_rng(104)
    cache, obs, _, (k, _, q, lengths) = planted_case(rng, True)
    valid = jnp.arange(CAP)[None, :] < cache.lengths[:, None]
    scores = np.asarray(SnapKVPress(capacity=8, window_size=WINDOW).scores(cache.k[1], valid, obs, 1, D**-0.5))
    ref = snap_votes_f64(q[1], k[1], np.asarray(obs.slots), np.asarray(obs.valid), lengths, 5, D**-0.5)
    for b in range(BATCH):  # the window is +inf (always kept); the rest are pooled votes
        n = int(lengths[b])
        assert np.isposinf(scores[b, :, n - WINDOW : n]).all()
        np.testing.assert_allclose(scores[b, :, : n - WINDOW], ref[b, :, : n - WINDOW], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stacked", [True, False])
def test_snapkv_keeps_exactly_the_numpy_set(stacked):
    rng = np.random.default_rng(105)
    cache, obs, needles, (k, v, q, lengths) = planted_case(rng, stacked)
    budget = WINDOW + 3 * 5  # the window and the three pooled needle neighbourhoods
    press = SnapKVPress(capacity=budget, window_size=WINDOW, kernel_size=5)
    out = kv_press.compress(press, cache, obs, D**-0.5, new_capacity=budget + 8)
    assert out.capacity == budget + 8 and (np.asarray(out.lengths) == budget).all()
    np.testing.assert_array_equal(np.asarray(out.positions), lengths + 5)
    for layer in range(LAYERS):
        ref_scores = snap_votes_f64(
            q[layer], k[layer], np.asarray(obs.slots), np.asarray(obs.valid), lengths, 5, D**-0.5
        )
        ref = kept_slots_f64(ref_scores, lengths, WINDOW, budget)
        got = cache_sets(out, k, layer)
        assert got == ref
        for b in range(BATCH):  # the plant worked: every needle is kept
            assert set(needles[b].tolist()) <= got[b, 0]
        vals = np.asarray(out.v[layer])  # values travel with their keys
        for (b, h), slots in got.items():
            np.testing.assert_array_equal(vals[b, :budget, h], v[layer, b, sorted(slots), h])


def test_streaming_llm_keeps_sinks_and_recent_on_ragged_rows():
    rng = np.random.default_rng(106)
    cache, _, _, (k, _, _, lengths) = planted_case(rng, True)
    press = StreamingLLMPress(capacity=20, n_sink=3)
    out = kv_press.compress(press, cache, None, D**-0.5, new_capacity=24)
    for layer in range(LAYERS):
        got = cache_sets(out, k, layer)
        for b in range(BATCH):
            n = int(lengths[b])
            assert got[b, 0] == got[b, 1] == set(range(3)) | set(range(n - 17, n))


def pyramid_budgets_f64(average, n, window, beta, layers):
    """PyramidKV's released schedule, in Python integers."""
    spare = max(average - window, 0)
    if n < 2 * spare:
        return [min(average, n)] * layers
    lo = spare // beta
    hi = 2 * spare - lo
    if hi >= n - window:
        hi = max(n - window, 0)
        lo = 2 * spare - hi
    step = (hi - lo) // (layers - 1)
    return [min(hi - i * step + window, n) for i in range(layers)]


def test_pyramidkv_budgets_and_sets():
    press = PyramidKVPress(capacity=4096, window_size=32, beta=20)
    n = jnp.asarray([100_000, 8100, 5000, 3000], jnp.int32)
    got = np.asarray(press.budgets(32, n, 100_000))
    for b, nb in enumerate(np.asarray(n)):
        assert got[:, b].tolist() == pyramid_budgets_f64(4096, int(nb), 32, 20, 32)
    assert abs(got[:, 0].mean() - 4096) < 0.02 * 4096  # about SnapKV's total: 4096 per layer
    assert (got[:, 2] == 4096).all() and (got[:, 3] == 3000).all()
    # kept sets: per layer, SnapKV's ranking cut at that layer's budget; layers right-aligned to one length
    rng = np.random.default_rng(107)
    cache, obs, _, (k, _, q, lengths) = planted_case(rng, True)
    press = PyramidKVPress(capacity=WINDOW + 12, window_size=WINDOW, beta=4)
    out = kv_press.compress(press, cache, obs, D**-0.5, new_capacity=64)
    budgets = np.asarray(press.budgets(LAYERS, cache.lengths, cache.capacity))
    assert budgets[0, 0] > budgets[1, 0]
    for layer in range(LAYERS):
        ref_scores = snap_votes_f64(
            q[layer], k[layer], np.asarray(obs.slots), np.asarray(obs.valid), lengths, 5, D**-0.5
        )
        for b in range(BATCH):
            ref = kept_slots_f64(ref_scores[b : b + 1], lengths[b : b + 1], WINDOW, int(budgets[layer, b]))
            got = cache_sets(out, k, layer)
            assert {h: got[b, h] for h in range(KVH)} == {h: ref[0, h] for h in range(KVH)}
    np.testing.assert_array_equal(np.asarray(out.lengths), budgets.max(0))


def test_press_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of capacity"):
        SnapKVPress(capacity=None)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        SnapKVPress(compression_ratio=1.5)
    with pytest.raises(ValueError, match="n_sink"):
        StreamingLLMPress(capacity=8, n_sink=9)
    with pytest.raises(ValueError, match="Unknown cache method"):
        lcjax.methods.cache_method("h2o")


def test_model_streaming_llm_cache_is_the_dense_cache_at_kept_slots(llama):
    prompt = np.random.default_rng(1).integers(0, llama.config.vocab_size, (2, 40))
    _, dense = llama.prefill(prompt, capacity=48)
    press = StreamingLLMPress(capacity=16, n_sink=4)
    _, small = llama.with_transforms(cache_transform=press).prefill(prompt, capacity=48)
    assert small.capacity == 16 + 8  # the press's bound plus the 8 slots of room asked for
    keep = list(range(4)) + list(range(28, 40))
    for layer in range(llama.config.num_layers):
        np.testing.assert_array_equal(np.asarray(small.k[layer])[:, :16], np.asarray(dense.k[layer])[:, keep])
    np.testing.assert_array_equal(np.asarray(small.positions), [40, 40])


def test_model_press_without_effect_changes_nothing(llama):
    """A budget above the prompt keeps everything: tokens equal dense generation over two turns."""
    prompt = np.random.default_rng(2).integers(0, llama.config.vocab_size, (2, 20))
    turn2 = prompt[:, :5]
    for press in (SnapKVPress(capacity=512, window_size=4), StreamingLLMPress(capacity=512, n_sink=4)):
        m = llama.with_transforms(cache_transform=press)
        a, ca = generate(llama, prompt, 4)
        b, cb = generate(m, prompt, 4)
        assert a == b
        assert generate(llama, turn2, 3, cache=ca)[0] == generate(m, turn2, 3, cache=cb)[0]


def test_pyramidkv_cache_decodes_the_same_with_kernel_and_xla(llama):
    """Layers that keep different counts start at different slots (`first`): the split-K kernel (interpret
    mode) and the XLA path must both honour it, over a decode and a second compressed turn."""
    config = dataclasses.replace(llama.config, head_dim=64)  # a head_dim the kernel supports
    model = lcjax.Transformer.init(config, jax.random.key(0), dtype=jnp.float32, std=0.2)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, (2, 48))
    press = PyramidKVPress(capacity=20, window_size=4, beta=2)
    runs = []
    for decode in ("pallas", "xla"):
        m = model.with_transforms(cache_transform=press, attention=lcjax.DenseAttention(decode=decode))
        toks, cache = generate(m, prompt, 4)
        assert len(set(np.asarray(cache.first[:, 0]).tolist())) > 1
        logits, cache = m.extend(prompt[:, :9], cache.with_capacity(cache.capacity + 16))
        runs.append((toks, np.asarray(logits), np.asarray(cache.lengths), np.asarray(cache.positions)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    np.testing.assert_array_equal(runs[0][3], [48 + 4 + 9] * 2)


def test_minference_prefill_composes_with_snapkv(llama):
    """MInference vertical-slash prefill + SnapKV cache, one line: the press sees the sparse method's queries
    and cache. With a budget above the prompt it must equal MInference alone; with a small one the cache holds
    the budget and the next turn runs over it."""
    from lcjax.methods import MInference

    c = llama.config
    sparse = llama.with_transforms(attention=MInference.vertical_slash(c.num_layers, c.num_heads, 8, 16, backend="xla"))
    prompt = np.random.default_rng(4).integers(0, c.vocab_size, (1, 96))
    alone, _ = generate(sparse, prompt, 4)
    kept_all, _ = generate(sparse.with_transforms(cache_transform=SnapKVPress(capacity=512, window_size=8)), prompt, 4)
    assert kept_all == alone
    both = sparse.with_transforms(cache_transform=SnapKVPress(capacity=24, window_size=8))
    toks, cache = generate(both, prompt, 4)
    assert int(cache.lengths[0]) == 24 + 4 and int(cache.positions[0]) == 96 + 4
    toks2, cache = generate(both, prompt[:, :10], 3, cache=cache)
    assert len(toks2[0]) == 3 and int(cache.lengths[0]) == 24 + 3 and int(cache.positions[0]) == 96 + 4 + 10 + 3


def test_kvpress_budgets_equal_kvpress_own_arithmetic():
    """With kvpress's compression_ratio, the kept counts are kvpress 0.5.5's: `compute_n_kept` for the uniform
    presses and PyramidKVPress's per-layer schedule (window inside each budget, uniform fallback), as its own code
    computed them (tests/fixtures/kvpress, made by tools/make_fixtures.py), through the traced budgets too."""
    cases = json.loads((FIXTURES / "kvpress" / "budgets.json").read_text())["cases"]
    assert len(cases) > 400
    for c in cases:
        n, ratio, layers = c["n"], c["ratio"], c["layers"]
        assert kv_press.ratio_kept(n, ratio)[n] == c["n_kept"], c
        table = kvpress_budgets(n, layers, ratio, c["window"], c["beta"])
        assert table[:, n].tolist() == c["pyramid"], c
    # through the press (lengths traced, a batch of them at once) for one setting
    chosen = [c for c in cases if (c["ratio"], c["window"], c["beta"], c["layers"]) == (0.4, 64, 20, 32)]
    press = PyramidKVPress(compression_ratio=0.4, beta=20)
    assert press.window_size == 64  # kvpress's default with a ratio (SCBench's 32 with a capacity)
    lengths = jnp.asarray([c["n"] for c in chosen], jnp.int32)
    got = np.asarray(press.budgets(32, lengths, 100_000))
    want = np.minimum(np.asarray([c["pyramid"] for c in chosen]).T, np.asarray(lengths)[None, :])
    np.testing.assert_array_equal(got, want)
    snap = SnapKVPress(compression_ratio=0.4)
    np.testing.assert_array_equal(
        np.asarray(snap.budgets(1, lengths, 100_000))[0], np.minimum([c["n_kept"] for c in chosen], lengths)
    )


def test_knorm_keeps_the_smallest_key_norms():
    """KnormPress against float64 NumPy: per layer and KV head the `budget` keys of smallest L2 norm, in order."""
    rng = np.random.default_rng(108)
    cache, _, _, (k, _, _, lengths) = planted_case(rng, True)
    out = kv_press.compress(KnormPress(capacity=20), cache, None, D**-0.5, new_capacity=24)
    for layer in range(LAYERS):
        norms = -np.linalg.norm(k[layer].astype(np.float64), axis=-1).transpose(0, 2, 1)  # [b, kvh, cap]
        assert cache_sets(out, k, layer) == kept_slots_f64(norms, lengths, 0, 20)


def test_tova_ranks_by_the_last_querys_attention_over_all_heads():
    """TOVAPress against float64 NumPy: the last query's softmax attention averaged over every query head (one
    ranking shared by the KV heads), the newest token always kept."""
    rng = np.random.default_rng(109)
    cache, obs, _, (k, _, q, lengths) = planted_case(rng, True)
    last = Observation(obs.q[:, :, -1:], obs.slots[:, -1:], obs.valid[:, -1:])
    press = TOVAPress(capacity=12)
    assert press.window_size == 1
    out = kv_press.compress(press, cache, last, D**-0.5, new_capacity=16)
    for layer in range(LAYERS):
        ref = np.zeros((BATCH, KVH, CAP))
        for b in range(BATCH):
            n = int(lengths[b])
            for h in range(HEADS):
                s = k[layer, b, :n, h // (HEADS // KVH)].astype(np.float64) @ q[layer, b, -1, h] * D**-0.5
                p = np.exp(s - s.max())
                ref[b, :, :n] += p / p.sum() / HEADS
        assert cache_sets(out, k, layer) == kept_slots_f64(ref, lengths, 1, 12)
