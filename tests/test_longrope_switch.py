"""A LongRoPE model whose conversation grows past `original_max_position_embeddings` re-rotates its cached keys
from the short to the long factors in the call that crosses. The first layer's cached keys then equal a fresh
prefill's under the long factors; deeper layers' keys and all values come from hidden states that attended under
the short factors, which no rotation undoes, so the logits come closer to a fresh long prefill but not equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcjax.models.transformer as transformer
from lcjax import positions
from lcjax.config import ModelConfig
from lcjax.generate import decode_step
from lcjax.models.transformer import Transformer

CONFIG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
ORIGINAL = 16
ROPE = positions.longrope(8, 10000.0, [1.0, 1.1, 1.3, 1.6], [1.0, 2.0, 5.0, 9.0], ORIGINAL, factor=4.0)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32, std=0.1, positions=ROPE)


def first_layer_keys(cache, n):
    keys = cache.k[0] if isinstance(cache.k, tuple) else cache.k[0]
    return np.asarray(keys[:, :n])


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_a_turn_that_crosses_rotates_the_cached_keys_to_the_long_factors(model, layout):
    model = model.with_layer_layout(layout)
    fresh_logits, fresh = model.prefill(TOKENS)  # 24 tokens: every position under the long factors
    _, cache = model.prefill(TOKENS[:, :10], capacity=24)  # 10 tokens: short factors
    assert np.abs(first_layer_keys(cache, 10) - first_layer_keys(fresh, 10)).max() > 1e-2
    logits, cache = model.extend(TOKENS[:, 10:], cache, logits="all")
    np.testing.assert_allclose(first_layer_keys(cache, 24), first_layer_keys(fresh, 24), atol=2e-6)
    np.testing.assert_allclose(logits, fresh_logits[:, 10:], atol=0.1)


def test_rotating_brings_the_crossing_turn_closer_to_a_fresh_long_prefill(model, monkeypatch):
    fresh, _ = model.prefill(TOKENS)
    lengths = jnp.full((2,), 14, jnp.int32)

    def crossing_turn():
        _, cache = model.prefill(TOKENS[:, :10], capacity=24)
        logits, _ = transformer._extend.__wrapped__(model, jnp.asarray(TOKENS[:, 10:]), lengths, cache, "all")
        return np.abs(np.asarray(logits) - np.asarray(fresh[:, 10:])).max()

    rotated = crossing_turn()
    monkeypatch.setattr(transformer, "cross_position_switch", lambda transform, cache, q_positions: cache)
    left_alone = crossing_turn()
    assert rotated < left_alone / 2, (rotated, left_alone)


def test_the_decode_step_that_crosses_rotates_the_cached_keys(model):
    _, fresh = model.prefill(TOKENS[:, :20])
    _, cache = model.prefill(TOKENS[:, :14], capacity=24)
    step = jax.jit(decode_step)
    for t in range(14, 20):  # the step at position 16 is the first under the long factors
        _, cache = step(model, jnp.asarray(TOKENS[:, t]), cache)
        crossed = t >= ORIGINAL
        error = np.abs(first_layer_keys(cache, t + 1) - first_layer_keys(fresh, t + 1)).max()
        assert (error < 2e-6) == crossed, (t, error)
