"""Transforms are values: a user-written attention function and position transform swap in without touching
the model, and the README's example transform behaves as documented."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

import lcjax
from lcjax.numerics import attention_mask, xla_attention


def sinks_and_window(window: int, sinks: int):
    def attention(q, k, v, cache, meta):
        if cache is not None:
            cache = cache.update(meta.layer, k, v, meta.start)
        slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        mask = attention_mask(slots, k.shape[1], meta.lengths, sliding_window=window)
        mask |= attention_mask(slots, k.shape[1], meta.lengths, None) & (jnp.arange(k.shape[1]) < sinks)
        return xla_attention(q, k, v, mask, meta.scale), cache

    return attention


@pytest.fixture(scope="module")
def llama():
    model, _ = lcjax.load_model(FIXTURES / "hf" / "llama", dtype="float32")
    return model, np.load(FIXTURES / "hf" / "llama" / "reference.npz")["input_ids"]


def test_custom_attention_with_full_window_equals_dense(llama):
    model, ids = llama
    dense, _ = model.prefill(ids)
    same, _ = model.with_transforms(attention=sinks_and_window(window=ids.shape[1], sinks=0)).prefill(ids)
    np.testing.assert_allclose(np.asarray(same), np.asarray(dense), atol=1e-5)


def test_custom_attention_changes_what_later_tokens_see(llama):
    model, ids = llama
    dense, _ = model.prefill(ids)
    sparse, _ = model.with_transforms(attention=sinks_and_window(window=8, sinks=2)).prefill(ids)
    dense, sparse = np.asarray(dense), np.asarray(sparse)
    # the first 8 positions see the same keys either way; later ones lose keys
    np.testing.assert_allclose(sparse[:, :8], dense[:, :8], atol=1e-5)
    assert np.abs(sparse[:, 10:] - dense[:, 10:]).max() > 1e-2


def test_position_transform_swaps_without_touching_the_model(llama):
    model, ids = llama
    plain = model.with_transforms(positions=lcjax.positions.rope(model.config.rotary_dim, model.config.rope.theta))
    assert model.positions != plain.positions and plain.params is model.params
    # Llama-3.1 scaling only rescales long wavelengths, so short-range logits stay close but not equal
    a, b = np.asarray(model(ids)), np.asarray(plain(ids))
    assert 0 < np.abs(a - b).max()


def test_long_prompt_options_keep_the_logits(llama):
    """`mlp_chunk` (MLP over sequence chunks, ragged last chunk) and `capacity=0` (no cache) change memory,
    not results."""
    model, ids = llama
    full, cache = model.prefill(ids, logits="last")
    chunked, no_cache = model.prefill(ids, logits="last", capacity=0, mlp_chunk=7)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5)
    assert no_cache is None and cache is not None
    with pytest.raises(ValueError, match="capacity 5 is smaller"):
        model.prefill(ids, capacity=5)
