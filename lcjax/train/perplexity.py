"""Perplexity of long text at a fixed context length, by sliding windows (as LongRoPE's evaluation measures it).

A token stream is cut into windows of `length` tokens starting every `stride` tokens (a window that would run
past the end is skipped); with a BOS id, each window starts with it and holds `length - 1` text tokens. In each
window only the predictions of tokens no earlier window scored count, so every scored token sees at least
`length - stride` tokens of context; a window's loss is the mean over its scored tokens, and the perplexity is
exp of the mean of the windows' losses. The default stride, a window's text tokens, puts the windows side by side:
each token is scored once, in one window.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import ModelConfig
from lcjax.models.attention import AttentionFn
from lcjax.models.transformer import Transformer, forward
from lcjax.train.loss import next_token_targets, token_loss


def sliding_windows(
    ids, length: int, stride: int | None = None, bos: int | None = None, max_windows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(windows int32 `[n, length]`, scored bool `[n, length]`) over the token stream `ids` (1-D).

    scored[w, t]: whether the prediction of token t of window w counts (never the first token, which nothing
    predicts). Raises ValueError when not one window fits."""
    ids = np.asarray(ids, np.int32)
    text = length - (bos is not None)  # text tokens per window
    stride = text if stride is None else stride
    if text < 1 or not 0 < stride <= text:
        raise ValueError(
            f"need 0 < stride <= the {text} text tokens of a window; got length {length}, stride {stride}."
        )
    starts = list(range(0, len(ids) - text + 1, stride))[:max_windows]
    if not starts:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of {length}.")
    windows, scored = [], []
    prev_end = 0
    for begin in starts:
        end = begin + text
        window = ids[begin:end]
        fresh = np.zeros(text, bool)
        fresh[max(prev_end - begin, 0) :] = True  # tokens past the previous window's end
        if bos is not None:
            window, fresh = np.concatenate([[bos], window]), np.concatenate([[False], fresh])
        fresh[0] = False
        windows.append(window)
        scored.append(fresh)
        prev_end = end
    return np.stack(windows).astype(np.int32), np.stack(scored)


@partial(jax.jit, static_argnames=("config", "attention", "position_transform"))
def sequence_losses(
    params: dict,
    config: ModelConfig,
    attention: AttentionFn,
    position_transform: Callable,
    tokens: jax.Array,
    scored: jax.Array,
) -> jax.Array:
    """Mean next-token loss of each row of `tokens: int [batch, seq]` over the tokens `scored: bool [batch, seq]`
    marks (their predictions count), fp32 `[batch]`; logits exist a chunk of positions at a time."""
    batch, seq = tokens.shape
    lengths = jnp.full((batch,), seq, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    targets, valid = next_token_targets(tokens, lengths)
    valid &= jnp.concatenate([scored[:, 1:], jnp.zeros_like(scored[:, :1])], axis=1)
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    hidden, _ = forward(
        params, config, tokens, positions, jnp.zeros_like(lengths), lengths, None, "prefill", attention,
        position_transform,
    )  # fmt: skip

    def row(xs):
        h, t, v = xs
        total, count = token_loss(h[None], head, t[None], v[None])
        return total / jnp.maximum(count, 1.0)

    return jax.lax.map(row, (hidden, targets, valid))


def window_losses(model: Transformer, windows: np.ndarray, scored: np.ndarray, batch: int = 1) -> np.ndarray:
    """Mean loss of each window under `model` (its attention and position transforms), fp32 `[n]`, `batch`
    windows per compiled call (the last call padded)."""
    out = []
    for start in range(0, len(windows), batch):
        w, s = windows[start : start + batch], scored[start : start + batch]
        pad = batch - len(w)
        if pad:
            w = np.concatenate([w, np.repeat(w[-1:], pad, 0)])
            s = np.concatenate([s, np.repeat(s[-1:], pad, 0)])
        losses = sequence_losses(
            model.params, model.config, model.attention, model.positions, jnp.asarray(w), jnp.asarray(s)
        )
        out.append(np.asarray(losses)[: batch - pad])
    return np.concatenate(out)


def perplexity(losses: np.ndarray) -> float:
    """exp of the mean of per-window mean losses."""
    return float(math.exp(float(np.mean(losses))))
