"""The decode loop and the cache lifecycle: samplers against numpy, multi-turn appends and forks against
recomputing from scratch, streaming, ragged batches, capacity policy. On the tiny Llama parity fixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

import lcjax
from lcjax.generate import generate
from lcjax.sampling import Greedy, Temperature, TopK, TopP


@pytest.fixture(scope="module")
def llama():
    model, _ = lcjax.load_model(FIXTURES / "hf" / "llama", dtype="float32")
    ids = np.load(FIXTURES / "hf" / "llama" / "reference.npz")["input_ids"][0]
    return model, [int(t) for t in ids]


def greedy_by_recomputing(model, ids, n):
    """Greedy continuation by running the whole sequence through the model at every step (no cache)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = np.asarray(model(np.asarray([ids], np.int32)))[0, -1]
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def numpy_keep(logits, sampler):
    """The tokens a sampler may draw, by sorting in numpy (float64)."""
    z = np.asarray(logits, np.float64) / sampler.temperature
    if isinstance(sampler, TopK):
        return z >= np.sort(z, axis=-1)[:, -sampler.k][:, None]
    if isinstance(sampler, TopP):
        keep = np.zeros(z.shape, bool)
        for r in range(z.shape[0]):
            order = np.argsort(-z[r], kind="stable")
            p = np.exp(z[r][order] - z[r].max())
            p /= p.sum()
            before = np.cumsum(p) - p
            keep[r, order[before < sampler.p]] = True
        return keep
    return np.isfinite(z)


@pytest.mark.parametrize("sampler", [TopK(k=5, temperature=0.7), TopP(p=0.6, temperature=1.3), TopP(p=1e-6)])
def test_sampler_keeps_exactly_the_numpy_set(sampler):
    rng = np.random.default_rng(102)
    logits = rng.standard_normal((6, 40)).astype(np.float32) * 3
    keep = np.asarray(sampler.keep(jnp.asarray(logits) / sampler.temperature))
    np.testing.assert_array_equal(keep, numpy_keep(logits, sampler))
    draws = np.stack([np.asarray(sampler(jnp.asarray(logits), jax.random.key(s))) for s in range(200)])
    assert keep[np.arange(6)[None, :], draws].all()  # every draw inside the kept set


def test_temperature_sampling_follows_the_softmax():
    rng = np.random.default_rng(103)
    logits = rng.standard_normal((1, 8)).astype(np.float32)
    sampler = Temperature(0.8)
    n = 20000
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), n)
    draws = np.asarray(jax.vmap(lambda k: sampler(jnp.asarray(logits), k))(keys))[:, 0]
    p = np.exp(logits[0] / 0.8 - (logits[0] / 0.8).max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=8) / n
    assert np.abs(freq - p).max() < 5 * np.sqrt(p.max() / n)  # 5 standard errors


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="TopP needs 0 < p <= 1"):
        TopP(p=1.5)
    with pytest.raises(ValueError, match="TopK needs k >= 1"):
        TopK(k=0)


def test_multi_turn_cache_equals_recomputing_the_conversation(llama):
    model, ids = llama
    turn1, turn2 = ids[:10], ids[10:17]
    (a,), cache = generate(model, turn1, 5)
    assert a == greedy_by_recomputing(model, turn1, 5)
    assert int(cache.lengths[0]) == 15  # prompt + every returned token
    (b,), cache = generate(model, turn2, 6, cache=cache)
    assert b == greedy_by_recomputing(model, turn1 + a + turn2, 6)
    assert int(cache.lengths[0]) == 15 + 7 + 6


def test_a_turn_past_capacity_grows_the_cache_or_raises_in_extend(llama):
    model, ids = llama
    _, cache = model.prefill(np.asarray([ids[:8]]), capacity=8)
    with pytest.raises(ValueError, match="holds 8; grow it with cache.with_capacity"):
        model.extend(np.asarray([ids[8:12]]), cache)
    (b,), grown = generate(model, ids[8:12], 4, cache=cache)  # generate grows by a copy instead
    assert grown.capacity >= 16 and b == greedy_by_recomputing(model, ids[:12], 4)


def test_forked_context_matches_fresh_prefills(llama):
    model, ids = llama
    context, suffixes = ids[:12], [ids[12:15], ids[20:23], ids[30:33]]
    _, cache = model.prefill(np.asarray([context]), capacity=12)
    forks = cache.fork(3)
    assert forks.batch == 3 and np.all(np.asarray(forks.lengths) == 12)
    outs, _ = generate(model, np.asarray(suffixes), 4, cache=forks)
    for suffix, out in zip(suffixes, outs):
        (fresh,), _ = generate(model, context + suffix, 4)
        assert out == fresh


def test_ragged_batch_stops_early_and_streams_in_order(llama):
    model, ids = llama
    prompts = np.zeros((2, 9), np.int32)
    prompts[0, :9], prompts[1, :5] = ids[:9], ids[:5]
    ref0, ref1 = greedy_by_recomputing(model, ids[:9], 6), greedy_by_recomputing(model, ids[:5], 6)
    stop = ref1[2]  # sequence 1 stops at its third token
    steps = []
    (a, b), cache = generate(
        model,
        prompts,
        6,
        lengths=[9, 5],
        stop_tokens=(stop,),
        stream=lambda step, toks: steps.append((int(step), [int(t) for t in toks])),
    )
    cut = ref0.index(stop) + 1 if stop in ref0 else 6
    assert a == ref0[:cut] and b == ref1[:3]
    assert [s for s, _ in steps] == list(range(len(steps)))
    assert [t[0] for _, t in steps if t[0] >= 0] == a and [t[1] for _, t in steps if t[1] >= 0] == b
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9 + len(a), 5 + len(b)])  # stopped rows froze


def test_sampled_generation_is_reproducible_per_seed(llama):
    model, ids = llama
    sampler = TopP(p=0.9, temperature=1.5)
    (a,), _ = generate(model, ids[:6], 8, sampler=sampler, seed=3)
    (b,), _ = generate(model, ids[:6], 8, sampler=sampler, seed=3)
    outs = {tuple(generate(model, ids[:6], 8, sampler=sampler, seed=s)[0][0]) for s in range(6)}
    assert a == b and len(outs) > 1
    assert generate(model, ids[:6], 8, sampler=Greedy())[0][0] == greedy_by_recomputing(model, ids[:6], 8)


def test_decode_through_the_pallas_kernel_gives_the_same_tokens(llama):
    """`DenseAttention(decode="pallas")` runs each decode step through the split-K kernel (interpret mode on
    CPU); greedy tokens equal the XLA path's and recomputation's, across a second turn. A random-weight model
    of the fixture's family with head_dim 64 (the kernel's smallest)."""
    import dataclasses

    base, ids = llama
    config = dataclasses.replace(base.config, head_dim=64)
    model = lcjax.Transformer.init(config, jax.random.key(0), dtype=jnp.float32, std=0.2)
    xla = model.with_transforms(attention=lcjax.DenseAttention(decode="xla"))
    kernel = model.with_transforms(attention=lcjax.DenseAttention(decode="pallas"))
    (a,), cache_a = generate(xla, ids[:7], 5)
    (b,), cache_b = generate(kernel, ids[:7], 5)
    assert a == b == greedy_by_recomputing(model, ids[:7], 5)
    (c,), _ = generate(kernel, ids[20:24], 4, cache=cache_b)
    assert (
        c
        == generate(xla, ids[20:24], 4, cache=cache_a)[0][0]
        == greedy_by_recomputing(model, ids[:7] + a + ids[20:24], 4)
    )


def test_unstacked_layers_give_the_same_tokens_and_logits(llama):
    """The per-layer (Python loop) layout must be the same model as the stacked (scan) one."""
    model = llama[0].with_layer_layout("stacked")  # load_model's default is unstacked on a GPU
    flat = model.with_layer_layout("unstacked")
    assert flat.layer_layout == "unstacked" and model.layer_layout == "stacked"
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 12))
    np.testing.assert_allclose(np.asarray(flat(prompt)), np.asarray(model(prompt)), atol=1e-5, rtol=1e-5)
    a, _ = generate(model, prompt, 6)
    b, cache = generate(flat, prompt, 6)
    assert a == b and not cache.stacked and len(cache.k) == model.config.num_layers
    c, _ = generate(flat, prompt[:, :3], 4, cache=cache.fork(1))  # a second turn on the per-layer cache
    c_ref, _ = generate(model, prompt[:, :3], 4, cache=generate(model, prompt, 6)[1])
    assert c == c_ref
    back = flat.with_layer_layout("stacked")
    for x, y in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_streaming_without_the_cpu_platform_names_the_fix(llama, monkeypatch):
    """With JAX_PLATFORMS=cuda a host callback has no CPU device to run on and failed inside the compiled loop,
    after the prefill: `generate` says so before doing any work. (The CPU platform's absence is simulated: on
    this machine it is the only one.)"""
    model, ids = llama

    def no_cpu(backend=None):
        raise RuntimeError("Unknown backend cpu")

    monkeypatch.setattr(jax, "local_devices", no_cpu)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    with pytest.raises(ValueError, match=r"stream= needs JAX's CPU platform.*'cuda'.*JAX_PLATFORMS=cuda,cpu"):
        generate(model, ids[:5], 3, stream=lambda step, tokens: None)
