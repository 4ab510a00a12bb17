"""Shapes of large configs through jax.eval_shape: nothing is allocated."""

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.config import llama3_8b_config
from lcjax.models.params import abstract_params
from lcjax.models.transformer import Transformer, _prefill


def test_llama3_8b_prefill_shapes_without_allocating():
    cfg = llama3_8b_config()
    params = abstract_params(cfg, jnp.bfloat16)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.num_params() == 8_030_261_248
    # a decode step reads every weight but the embedding table (one row per sequence): the lm_head is untied
    assert cfg.decode_params_read() == n - params["embed"].size
    model = Transformer(params, cfg)
    tokens = jax.ShapeDtypeStruct((2, 4096), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    logits, cache = jax.eval_shape(lambda m, t, l: _prefill(m, t, l, 5000, "last"), model, tokens, lengths)
    assert logits.shape == (2, 128256) and logits.dtype == jnp.float32
    assert cache.k.shape == (32, 2, 5000, 8, 128) and cache.k.dtype == jnp.bfloat16
    assert cache.lengths.shape == (2,)


def test_tied_head_reads_the_embedding_table_whole():
    cfg = dataclasses.replace(llama3_8b_config(), tie_word_embeddings=True)
    params = abstract_params(cfg, jnp.bfloat16)
    assert "lm_head" not in params
    assert cfg.decode_params_read() == cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
