"""Quest and KIVI as cache transforms inside the model: the caches they make stay exact through prefill, decode
steps, turns, forks, crops and growth (Quest's bounds equal bounds recomputed from the keys; KIVI's codes equal
the quantised dense keys), a budget that covers the cache gives dense tokens, and SnapKV + Quest compose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import prompt_of

import lcjax
from lcjax.cache import cache_nbytes
from lcjax.generate import generate
from lcjax.methods import KIVI, KIVICache, Quest, QuestCache, SnapKVPress
from lcjax.methods.quest_pages import page_bounds
from lcjax.pallas.kivi_quant import quantize_keys, quantize_values


def assert_bounds_exact(cache: QuestCache):
    """The cache's page bounds equal bounds recomputed from its valid keys, layer by layer."""
    for layer in range(cache.first.shape[0]):
        k, _ = cache.layer_kv(layer)
        kmin, kmax = page_bounds(k, cache.lengths, cache.page_size, cache.layer_first(layer))
        np.testing.assert_array_equal(np.asarray(cache.kmin[layer]), np.asarray(kmin))
        np.testing.assert_array_equal(np.asarray(cache.kmax[layer]), np.asarray(kmax))


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_quest_full_budget_is_dense_over_turns_and_bounds_stay_exact(llama, layout):
    model = llama.with_layer_layout(layout)
    prompt, turn2 = prompt_of(model, 1, (2, 40)), prompt_of(model, 2, (2, 7))
    q = model.with_transforms(cache_transform=Quest(token_budget=1024, chunk_size=16))
    a, ca = generate(model, prompt, 6, stop_tokens=(int(prompt[1, 3]),))
    b, cb = generate(q, prompt, 6, stop_tokens=(int(prompt[1, 3]),))
    assert isinstance(cb, QuestCache) and a == b
    assert_bounds_exact(cb)  # incremental updates during decode, stopped rows ignored
    assert generate(model, turn2, 4, cache=ca)[0] == generate(q, turn2, 4, cache=cb)[0]
    for derived in (cb.fork(2), cb.crop(30), cb.with_capacity(cb.capacity + 40)):
        assert_bounds_exact(derived)


def test_quest_small_budget_reads_fewer_pages_and_changes_tokens(llama):
    """A budget of two 8-token pages over a 40-token context must change what the model sees (a test that the
    page choice is really applied) while the prompt's cache itself stays the dense one."""
    prompt = prompt_of(llama, 3, (2, 40))
    dense, cd = generate(llama, prompt, 6)
    small, cs = generate(llama.with_transforms(cache_transform=Quest(token_budget=16, chunk_size=8)), prompt, 6)
    assert small != dense
    np.testing.assert_array_equal(np.asarray(cs.k)[:, :, :40], np.asarray(cd.k)[:, :, :40])


def test_snapkv_then_quest_compose(llama):
    """SnapKV compresses, Quest bounds the kept tokens (per-layer `first` included) and selects pages; with a
    Quest budget over the whole compressed cache the tokens equal SnapKV alone."""
    prompt = prompt_of(llama, 4, (2, 40))
    snap = SnapKVPress(capacity=24, window_size=4)
    alone, _ = generate(llama.with_transforms(cache_transform=snap), prompt, 5)
    both = llama.with_transforms(cache_transform=(snap, Quest(token_budget=64, chunk_size=8)))
    toks, cache = generate(both, prompt, 5)
    assert toks == alone and isinstance(cache, QuestCache)
    assert np.asarray(cache.lengths).tolist() == [24 + 5] * 2
    assert_bounds_exact(cache)
    with pytest.raises(ValueError, match="at most one transform may observe"):
        llama.with_transforms(cache_transform=(snap, SnapKVPress(capacity=8)))


KIVI_SMALL = dict(bits=2, group_size=8, residual_length=16)  # the fixture's head_dim is 16


def assert_kivi_holds(cache: KIVICache, layer: int, keys, values, lengths):
    """Slots below each row's quantised count hold exactly the quantised `keys`/`values` (`[batch, >= length,
    kv_heads, d]`, the full-precision tensors that were written), the residual holds the rest verbatim."""
    R, G, bits = cache.residual, cache.group, cache.bits
    for b, n in enumerate(lengths):
        done = int(cache.quantized[layer][b])
        assert done == n // R * R
        if done:
            qk = quantize_keys(jnp.asarray(keys[b : b + 1, :done]), G, bits)
            qv = quantize_values(jnp.asarray(values[b : b + 1, :done]), G, bits)
            np.testing.assert_array_equal(np.asarray(cache.k_codes[layer][b : b + 1, :done]), np.asarray(qk.packed))
            np.testing.assert_array_equal(
                np.asarray(cache.k_scale[layer][b : b + 1, : done // G]), np.asarray(qk.scale)
            )
            np.testing.assert_array_equal(np.asarray(cache.k_zero[layer][b : b + 1, : done // G]), np.asarray(qk.zero))
            np.testing.assert_array_equal(np.asarray(cache.v_codes[layer][b : b + 1, :done]), np.asarray(qv.packed))
            np.testing.assert_array_equal(np.asarray(cache.v_scale[layer][b : b + 1, :done]), np.asarray(qv.scale))
        # (decode steps project one token at a time: float32 rounding differs from the batched prefill's)
        np.testing.assert_allclose(
            np.asarray(cache.k_res[layer][b, : n - done]), np.asarray(keys[b, done:n]), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(cache.v_res[layer][b, : n - done]), np.asarray(values[b, done:n]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_kivi_cache_is_the_quantised_dense_cache(llama, layout):
    """Ragged prefill, then decode steps that cross residual boundaries: layer 0's keys depend on the tokens
    only, so a dense prefill of the final sequence gives the exact full-precision keys KIVI was handed."""
    model = llama.with_layer_layout(layout)
    prompt, lengths = prompt_of(model, 5, (2, 45)), np.array([45, 30])
    m = model.with_transforms(cache_transform=KIVI(**KIVI_SMALL))
    _, cache = m.prefill(prompt, lengths, capacity=64)
    _, dense = model.prefill(prompt, lengths, capacity=64)
    assert isinstance(cache, KIVICache) and cache.capacity == 64
    for layer in range(model.config.num_layers):
        assert_kivi_holds(cache, layer, *dense.layer_kv(layer), lengths)
    toks, cache = generate(m, prompt, 9, lengths=lengths)
    full = np.zeros((2, 54), np.int64)
    for b in range(2):
        full[b, : lengths[b] + 9] = np.concatenate([prompt[b, : lengths[b]], toks[b]])
    _, dense = model.prefill(full, lengths + 9)
    assert_kivi_holds(cache, 0, *dense.layer_kv(0), lengths + 8)  # the last sampled token is not yet written


def test_kivi_decode_reads_exactly_what_is_stored(llama):
    """A KIVI decode step's logits equal the dense model's over a dense cache holding KIVI's dequantised keys
    and values (so the quantised read path, codes and residual together, is the stored cache)."""
    m = llama.with_transforms(cache_transform=KIVI(**KIVI_SMALL))
    prompt, lengths = prompt_of(llama, 6, (2, 40)), np.array([40, 27])
    _, cache = m.prefill(prompt, lengths, capacity=48)
    layers = range(llama.config.num_layers)
    views = [cache.layer_kv(l) for l in layers]
    dense = lcjax.KVCache(
        k=jnp.stack([k for k, _ in views]),
        v=jnp.stack([v for _, v in views]),
        lengths=cache.lengths,
        positions=cache.positions,
        first=cache.first,
    )
    nxt = jnp.asarray(prompt_of(llama, 7, (2,)), jnp.int32)
    from lcjax.generate import decode_step

    got, _ = jax.jit(decode_step)(m, nxt, cache)
    want, _ = jax.jit(decode_step)(llama, nxt, dense)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kivi_fork_crop_capacity(llama):
    m = llama.with_transforms(cache_transform=KIVI(**KIVI_SMALL))
    prompt = prompt_of(llama, 8, (1, 37))
    toks, cache = generate(m, prompt, 6)
    forked = cache.fork(2)
    turn = prompt_of(llama, 9, (1, 5))
    one = generate(m, turn, 4, cache=cache)[0]
    assert generate(m, np.repeat(turn, 2, 0), 4, cache=forked)[0] == one * 2
    grown = cache.with_capacity(cache.capacity + 20)
    for layer in range(llama.config.num_layers):
        for a, b in zip(grown.layer_kv(layer), cache.layer_kv(layer)):
            np.testing.assert_array_equal(np.asarray(a)[:, :43], np.asarray(b)[:, :43])
    cropped = cache.crop(20)  # back into the quantised blocks (done was 32)
    assert int(cropped.quantized[0, 0]) == 16 and int(cropped.lengths[0]) == 20
    for layer in range(llama.config.num_layers):
        for a, b in zip(cropped.layer_kv(layer), cache.layer_kv(layer)):
            np.testing.assert_array_equal(np.asarray(a)[:, :20], np.asarray(b)[:, :20])
    assert len(generate(m, turn, 3, cache=cropped)[0][0]) == 3


def test_kivi_memory_is_real():
    """2-bit, groups of 32, head_dim 128: codes d/4 bytes per token and head for K and V, fp16 scale + zero per
    32 tokens and channel (K) and per token and 32 channels (V), plus the 32-token bf16 residual."""
    layers, batch, cap, kvh, d = 2, 1, 4096, 8, 128
    cache = KIVICache.init(layers, batch, cap, kvh, d, jnp.bfloat16, stacked=False)
    dense = lcjax.KVCache.init(layers, batch, cap, kvh, d, jnp.bfloat16, stacked=False)
    per_layer = (
        2 * cap * kvh * d // 4 + 2 * 2 * (cap // 32) * kvh * d + 2 * 2 * cap * kvh * (d // 32) + 2 * 2 * 32 * kvh * d
    )
    counters = 2 * 4 * layers * batch + 2 * 4 * batch  # quantized, first [layers, batch]; lengths, positions
    assert cache_nbytes(cache) == layers * per_layer + counters
    ratio = cache_nbytes(cache) / cache_nbytes(dense)
    assert 0.1875 < ratio < 0.1875 + 0.01


def test_kivi_and_a_press_do_not_combine_in_either_order(llama):
    """A press needs dense K/V and KIVI must make the cache: each order fails naming the problem, never running
    one of the two silently."""
    m = llama.with_transforms(cache_transform=(SnapKVPress(capacity=8, window_size=4), KIVI(**KIVI_SMALL)))
    with pytest.raises(ValueError, match="a press cannot be combined with a transform that stores K/V otherwise"):
        m.prefill(prompt_of(llama, 10, (1, 20)))
    m = llama.with_transforms(cache_transform=(KIVI(**KIVI_SMALL), SnapKVPress(capacity=8, window_size=4)))
    with pytest.raises(ValueError, match=r"KIVI quantises the cache it makes \(KIVICache\), got a KVCache"):
        m.prefill(prompt_of(llama, 10, (1, 20)))


@pytest.mark.parametrize("method", ["dense", "kivi", "snapkv", "quest", "tova"])
def test_prefill_in_batch_chunks_equals_whole_batch(llama, method):
    """`prefill(batch_chunk=...)` runs groups of sequences and writes each group's cache into the batch's: the
    logits and every cache leaf equal one batched prefill (ragged rows, each cache kind)."""
    kw = dict(kivi=KIVI_SMALL, snapkv=dict(capacity=20, window_size=4), quest=dict(token_budget=32, chunk_size=8),
              tova=dict(capacity=20))  # fmt: skip
    m = llama.with_transforms(cache_transform=lcjax.methods.cache_method(method, **kw.get(method, {})) or "dense")
    prompt, lengths = prompt_of(llama, 11, (3, 37)), np.array([37, 22, 30])
    whole_logits, whole = m.prefill(prompt, lengths, capacity=48, logits="last")
    logits, cache = m.prefill(prompt, lengths, capacity=48, logits="last", batch_chunk=2)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(whole_logits), rtol=1e-5, atol=1e-5)
    assert type(cache) is type(whole)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(whole)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
