"""LongRoPE's factor search: seeds and operators keep the constraints, the search beats its seeds on a planted
optimum, a killed search resumes to the same population, the model fitness equals the loss the model gives
under the same factors through its position transform, on one device or split over eight, and a searched genome
exports as transformers' longrope config and loads back."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax import positions
from lcjax.config import LONGROPE_N_HAT_KEY, ModelConfig, RopeConfig, with_longrope
from lcjax.models.transformer import Transformer
from lcjax.sharding import make_mesh
from lcjax.train import TrainConfig, loss_and_count
from lcjax.train.longrope_search import (
    N_HAT_CHOICES,
    SHIPPED_FACTORS,
    Genome,
    SearchConfig,
    apply_factors,
    crossover,
    longrope_attention_factor,
    model_fitness,
    mutate,
    read_factors,
    search,
    seed_genomes,
    valid,
)

SMALL = SearchConfig(scale=4.0, dims=8, population=16, parents=8, mutations=4, crossovers=4, generations=12)


def test_seeds_are_pi_ntk_and_yarn_and_operators_keep_the_constraints():
    pi, ntk, yarn = seed_genomes(SMALL, theta=10000.0, rotary_dim=16, original_length=64)
    assert pi.factors == (4.0,) * 8
    assert ntk.factors[0] == 1.0 and ntk.factors[-1] == 4.0  # NTK: high frequencies kept, the lowest divided by s
    assert yarn.factors[0] == 1.0 and yarn.factors[-1] == 4.0
    rng = np.random.default_rng(0)
    pool = [pi, ntk, yarn]
    for _ in range(300):
        a, b = (pool[i] for i in rng.integers(len(pool), size=2))
        pool.append(mutate(a, SMALL, rng) if rng.random() < 0.5 else crossover(a, b, SMALL, rng))
    assert all(valid(g, SMALL) for g in pool)
    assert {g.n_hat for g in pool} > {0}, "n-hat never moved"
    assert len({g.key() for g in pool}) > 200
    assert not valid(Genome((1.0, 2.0, 1.5) + (4.0,) * 5), SMALL)  # decreasing
    assert not valid(Genome((1.0,) * 7 + (5.1,)), SMALL)  # past the cap of 1.25 x 4
    assert not valid(Genome((1.0,) * 8, n_hat=3), SMALL)  # not one of the paper's choices


PLANTED = Genome((1.0, 1.0, 1.3, 1.8, 2.6, 3.3, 4.4, 4.7), n_hat=16)


def planted_fitness(genomes):
    return np.asarray(
        [np.sum((np.asarray(g.factors) - PLANTED.factors) ** 2) + 0.05 * abs(np.log2(g.n_hat + 1) - 4) for g in genomes]
    )


def test_the_search_beats_its_seeds_and_moves_towards_a_planted_optimum():
    seeds = seed_genomes(SMALL, 10000.0, 16, 64)
    result = search(planted_fitness, SMALL, seeds, progress=False)
    best_seed = planted_fitness(seeds).min()
    assert result.best_loss < 0.5 * best_seed, (result.best_loss, best_seed)
    assert all(b >= a for a, b in zip(result.history[1:], result.history))  # elitism: never worse
    assert valid(result.best, SMALL) and len(result.population) == SMALL.parents + 8


def test_a_killed_search_resumes_to_the_same_population(tmp_path):
    seeds = seed_genomes(SMALL, 10000.0, 16, 64)
    straight = search(planted_fitness, SMALL, seeds, tmp_path / "a.json", progress=False)
    calls = []

    def dies_in_generation_5(genomes):
        calls.append(len(genomes))
        if len(calls) == 6:
            raise KeyboardInterrupt
        return planted_fitness(genomes)

    with pytest.raises(KeyboardInterrupt):
        search(dies_in_generation_5, SMALL, seeds, tmp_path / "b.json", progress=False)
    resumed = search(planted_fitness, SMALL, seeds, tmp_path / "b.json", progress=False)
    assert resumed.population == straight.population and resumed.history == straight.history
    with pytest.raises(ValueError, match="other settings"):
        search(planted_fitness, dataclasses.replace(SMALL, seed=1), seeds, tmp_path / "b.json", progress=False)


CONFIG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=16,
)  # fmt: skip


@pytest.mark.skipif(jax.device_count() < 8, reason="the split over devices needs 8 (the CPU suite fakes them)")
def test_model_fitness_is_the_models_loss_under_those_factors_on_one_device_or_eight():
    model = Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32, std=0.3)
    tokens = np.random.default_rng(1).integers(0, 64, (2, 48)).astype(np.int32)
    genomes = [Genome((1.0, 1.5, 2.0, 3.0)), Genome((1.0, 1.0, 2.5, 4.0), n_hat=8), Genome((3.0,) * 4, n_hat=2)]
    got = model_fitness(model, tokens, scale=3.0, original_length=16)(genomes)
    split = model_fitness(model, tokens, 3.0, 16, mesh=make_mesh(data=8, tensor=1))(genomes)
    np.testing.assert_allclose(split, got, rtol=1e-6)

    train = TrainConfig(compute_dtype="float32", remat=None)
    lengths = jnp.full((2,), 48, jnp.int32)
    for genome, loss in zip(genomes[1:], got[1:]):  # n-hat 8 and 2 (each its own compile)
        transform = positions.longrope(
            8, CONFIG.rope.theta, genome.factors, genome.factors, 16, factor=3.0, n_hat=genome.n_hat
        )
        assert transform.attention_factor == pytest.approx(longrope_attention_factor(3.0, 16))
        total, count = loss_and_count(model.params, model.with_transforms(positions=transform), tokens, lengths, train)
        np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    assert len(set(np.round(got, 5))) == 3


def test_n_hat_keeps_the_first_positions_unscaled():
    factors = np.array([1.0, 2.0, 4.0, 8.0])
    transform = positions.longrope(8, 100.0, factors, factors, 4, factor=2.0, n_hat=N_HAT_CHOICES[3])  # n_hat 4
    rot = transform(jnp.arange(10)[None])
    base = 1.0 / 100.0 ** (np.arange(4) / 4)
    pos = np.arange(10)[:, None]
    angles = np.where(pos < 4, pos * base, pos * base / factors)
    scale = transform.attention_factor
    np.testing.assert_allclose(rot.cos[0], np.cos(angles) * scale, atol=1e-6)
    np.testing.assert_allclose(rot.sin[0], np.sin(angles) * scale, atol=1e-6)


def test_a_searched_genome_exports_as_transformers_longrope_and_loads_back():
    """The searched factors as a config: transformers' longrope keys (n-hat in lcjax's own key), the same config
    after a round trip through config.json, and a position transform with the search's cos and sin."""
    genome = Genome((1.0, 1.5, 2.0, 3.0), n_hat=8)
    longer = with_longrope(CONFIG, genome.factors, 64, n_hat=genome.n_hat)
    hf = longer.to_hf_config()
    assert hf["rope_parameters"] == {
        "rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0] * 4, "long_factor": [1.0, 1.5, 2.0, 3.0], "rope_theta": 10000.0,
    } and hf[LONGROPE_N_HAT_KEY] == 8 and hf["max_position_embeddings"] == 64  # fmt: skip
    again = ModelConfig.from_hf_config(json.loads(json.dumps(hf)))
    assert again == longer
    rope = positions.from_config(again)
    pos = jnp.arange(40)[None]
    base = jnp.asarray(1.0 / 10000.0 ** (np.arange(4) / 4), jnp.float32)
    want = positions.rescaled_rotary(pos, base, jnp.asarray(genome.factors), 8, longrope_attention_factor(4.0, 16))
    np.testing.assert_allclose(rope(pos).cos, want.cos, atol=2e-6)
    np.testing.assert_allclose(rope(pos).sin, want.sin, atol=2e-6)


@pytest.mark.parametrize("name", sorted(SHIPPED_FACTORS))
def test_shipped_factors_keep_the_constraints_and_apply_to_the_built_in_model(name):
    """The factors searched on the device for SmolLM2-135M (trained on 8192 tokens, head_dim 64): read by name,
    non-decreasing within [1, 1.25 x scale], and a config they extend rotates as their LongRoPE transform."""
    f = read_factors(name)
    scale = f["max_position_embeddings"] / f["original_max_position_embeddings"]
    for key in ("long_factor", "short_factor"):
        x = np.asarray(f[key])
        assert len(x) == 32 and x[0] >= 1 and (np.diff(x) >= 0).all() and x[-1] <= 1.25 * scale + 1e-9
    smol = ModelConfig(
        family="llama", vocab_size=64, hidden_size=576, intermediate_size=64, num_layers=1, num_heads=9,
        num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope=RopeConfig(theta=100000.0),
    )  # fmt: skip
    extended = apply_factors(smol, f)
    assert extended.max_position_embeddings == f["max_position_embeddings"]
    assert extended.rope.long_factor == tuple(f["long_factor"])
