"""Generation: one prefill (or an appended turn), then one jitted `lax.while_loop` that decodes until every
sequence stops. Greedy by default; any `lcjax.sampling` sampler; stop tokens, ragged batches, early exit when
all sequences have stopped, optional streaming of each step's tokens to a callback, and multi-turn use by
passing the returned cache back in.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache import Cache
from lcjax.models.inputs import token_batch, warn_past_context
from lcjax.models.transformer import Transformer, cross_position_switch, forward, lm_logits
from lcjax.sampling import Greedy, Sampler

CAPACITY_BUCKET = 256  # caches are sized in multiples of this, so nearby lengths reuse one compiled loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
    step: jax.Array  # int32 [], tokens emitted so far
    tokens: jax.Array  # int32 [batch, max_new_tokens]
    last: jax.Array  # int32 [batch], the token to feed next
    done: jax.Array  # bool [batch]
    cache: Cache


def decode_step(
    model: Transformer, tokens: jax.Array, cache: Cache, active: jax.Array | None = None
) -> tuple[jax.Array, Cache]:
    """Feeds `tokens: int32 [batch]` (one per sequence) and returns their logits `[batch, vocab]`. Sequences
    where `active: bool [batch]` is False compute but do not advance their cache (their slot is rewritten)."""
    start = cache.lengths
    step = jnp.ones_like(start) if active is None else active.astype(jnp.int32)
    cache = cross_position_switch(model.positions, cache, cache.positions[:, None])
    # a stopped sequence's token is written past its length: invalid, so caches with derived state ignore it
    hidden, cache = forward(
        model.params,
        model.config,
        tokens[:, None],
        cache.positions[:, None],
        start,
        start + step,
        cache,
        "extend",
        model.attention,
        model.positions,
    )
    return lm_logits(model.params, model.config, hidden[:, 0]), cache.advance(step)


def _token_buffer(max_new_tokens: int) -> int:
    """Slots for the emitted tokens: a power of two (at least 64), so that budgets of one bucket share one
    compiled loop (the budget itself is a traced bound)."""
    return max(64, 1 << (max_new_tokens - 1).bit_length())


@partial(jax.jit, static_argnames=("buffer", "stop_tokens", "sampler", "stream"), donate_argnames=("cache",))
def _decode_loop(
    model: Transformer,
    first: jax.Array,
    cache: Cache,
    key: jax.Array,
    max_new_tokens: jax.Array,
    buffer: int,
    stop_tokens: tuple[int, ...],
    sampler: Sampler,
    stream: Callable | None,
) -> _DecodeState:
    batch = first.shape[0]
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def cond(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _DecodeState):
        emitted = jnp.where(s.done, -1, s.last)
        if stream is not None:
            jax.debug.callback(stream, s.step, emitted, ordered=True)
        tokens = s.tokens.at[:, s.step].set(emitted)
        logits, cache = decode_step(model, s.last, s.cache, active=~s.done)
        done = s.done | jnp.isin(s.last, stops)
        nxt = sampler(logits, jax.random.fold_in(key, s.step + 1))
        return _DecodeState(s.step + 1, tokens, nxt, done, cache)

    init = _DecodeState(jnp.int32(0), jnp.full((batch, buffer), -1, jnp.int32), first, jnp.zeros((batch,), bool), cache)
    return jax.lax.while_loop(cond, body, init)


def _bucket(n: int) -> int:
    return -(-n // CAPACITY_BUCKET) * CAPACITY_BUCKET


def _check_streaming_can_run() -> None:
    """`stream` runs a host callback from the compiled loop (`jax.debug.callback`), which places its inputs on a
    CPU device; with JAX_PLATFORMS=cuda the CPU platform is absent and it would fail inside the loop, after the
    prefill."""
    try:
        jax.local_devices(backend="cpu")
    except RuntimeError:
        raise ValueError(
            "stream= needs JAX's CPU platform (a host callback's inputs go to a CPU device), which "
            f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} leaves out: list it too, e.g. "
            "JAX_PLATFORMS=cuda,cpu."
        ) from None


def generate(
    model: Transformer,
    prompt,
    max_new_tokens: int,
    *,
    cache: Cache | None = None,
    lengths=None,
    sampler: Sampler = Greedy(),
    seed: int | jax.Array = 0,
    stop_tokens: tuple[int, ...] | None = None,
    stream: Callable[[int, np.ndarray], None] | None = None,
    capacity: int | None = None,
) -> tuple[list[list[int]], Cache]:
    """Continues `prompt: int [batch, seq]` (right-padded to `lengths: [batch]`), or one list of ids.

    cache: None prefills the prompt from scratch; a `Cache` from an earlier call appends the prompt to it
    as the next turn (the cache is grown, by a copy, when the turn and `max_new_tokens` do not fit).
    sampler: `Greedy()` (default), `Temperature`, `TopK`, `TopP` from `lcjax.sampling`; seed: int or PRNG key.
    stop_tokens: ids that end a sequence (included in its output); None: `model.stop_tokens`, the tokenizer's
    end-of-sequence and end-of-turn ids for a model from `load_model`; () never stops early.
    stream: called as `stream(step, tokens)` after each step with int `[batch]` tokens (-1 where a sequence
    has stopped), in order, from inside the compiled loop.
    capacity: slots of the cache a prefill makes (default: the prompt and max_new_tokens, rounded up to a
    multiple of `CAPACITY_BUCKET`); room for later turns saves growing it (a copy and a new compile) then.
    Returns, per sequence, the new tokens up to and including the first stop token (at most `max_new_tokens`)
    and the cache holding the prompt and every returned token.
    """
    batch = None if cache is None else cache.batch
    prompt, lengths = token_batch(prompt, lengths, model.config.vocab_size, "prompt", batch)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    stop_tokens = model.stop_tokens if stop_tokens is None else stop_tokens
    if stream is not None:
        _check_streaming_can_run()
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    # the prefill or extend below warns for the prompt itself; here only for the tokens generated past the limit
    prompt_end = (0 if cache is None else int(jnp.max(cache.positions))) + int(lengths.max())
    if prompt_end <= model.config.max_position_embeddings:
        warn_past_context(prompt_end + max_new_tokens, model.config.max_position_embeddings, model.scales_context)
    if cache is None:
        need = prompt.shape[1] + max_new_tokens
        if capacity is not None and capacity < need:
            raise ValueError(f"capacity {capacity} is below the prompt and max_new_tokens ({need} slots).")
        logits, cache = model.prefill(
            prompt, lengths, capacity=_bucket(need) if capacity is None else capacity, logits="last"
        )
    else:
        need = cache.slots_needed(prompt.shape[1] + max_new_tokens)
        if need > cache.capacity:
            cache = cache.with_capacity(_bucket(need))
        logits, cache = model.extend(prompt, cache, lengths)
    first = sampler(logits, jax.random.fold_in(key, 0))
    state = _decode_loop(
        model,
        first,
        cache,
        key,
        jnp.int32(max_new_tokens),
        _token_buffer(max_new_tokens),
        tuple(int(t) for t in stop_tokens),
        sampler,
        stream,
    )
    return [[int(t) for t in row if t >= 0] for row in np.asarray(state.tokens)], state.cache
