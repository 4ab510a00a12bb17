"""Greedy generation: one prefill, then one jitted `lax.while_loop` that decodes until every sequence stops.

This is the foundation's decoder (greedy, stop tokens, ragged batches); samplers, streaming and cache
reuse across turns build on the same loop.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache import KVCache
from lcjax.models.transformer import Transformer, forward, lm_logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
    step: jax.Array        # int32 [], tokens emitted so far
    tokens: jax.Array      # int32 [batch, max_new_tokens]
    last: jax.Array        # int32 [batch], the token to feed next
    done: jax.Array        # bool [batch]
    cache: KVCache


def decode_step(model: Transformer, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feeds `tokens: int32 [batch]` (one per sequence) and returns their logits `[batch, vocab]`."""
    start = cache.lengths
    hidden, cache = forward(model.params, model.config, tokens[:, None], cache.positions[:, None], start,
                            start + 1, cache, "extend", model.attention, model.positions)
    return lm_logits(model.params, model.config, hidden[:, 0]), cache.advance(jnp.ones_like(start))


@partial(jax.jit, static_argnames=("max_new_tokens", "stop_tokens"), donate_argnames=("cache",))
def _decode_loop(model: Transformer, first: jax.Array, cache: KVCache, max_new_tokens: int,
                 stop_tokens: tuple[int, ...]) -> _DecodeState:
    batch = first.shape[0]
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def cond(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _DecodeState):
        tokens = s.tokens.at[:, s.step].set(jnp.where(s.done, -1, s.last))
        done = s.done | jnp.isin(s.last, stops)
        logits, cache = decode_step(model, s.last, s.cache)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _DecodeState(s.step + 1, tokens, nxt, done, cache)

    init = _DecodeState(jnp.int32(0), jnp.full((batch, max_new_tokens), -1, jnp.int32), first,
                        jnp.zeros((batch,), bool), cache)
    return jax.lax.while_loop(cond, body, init)


def generate(model: Transformer, prompt, max_new_tokens: int, *, lengths=None,
             stop_tokens: tuple[int, ...] = ()) -> tuple[list[list[int]], KVCache]:
    """Greedy continuation of `prompt: int [batch, seq]` (right-padded to `lengths`), or one list of ids.

    Returns, per sequence, the new tokens up to and including the first stop token (at most
    `max_new_tokens`), and the cache after the last decoded token.
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    logits, cache = model.prefill(prompt, lengths, capacity=prompt.shape[1] + max_new_tokens, logits="last")
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    state = _decode_loop(model, first, cache, max_new_tokens, tuple(int(t) for t in stop_tokens))
    out = []
    for row in np.asarray(state.tokens):
        row = [int(t) for t in row if t >= 0]
        out.append(row)
    return out, state.cache
