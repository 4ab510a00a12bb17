"""The causal language-model loss, with fp32 logits computed a chunk of positions at a time.

At 32K tokens and a 49K vocabulary the logits alone are 6.4 GB in fp32; here they exist for `chunk` positions at
once, in the forward pass and (each chunk recomputed under `jax.checkpoint`) in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets int `[batch, seq]`, valid bool `[batch, seq]`): position t predicts token t + 1, for t + 1 < length.

    tokens: int `[batch, seq]`, right-padded to lengths: int `[batch]`. Computed before any reordering of the
    sequence, so the pairs survive context parallelism's permutation."""
    seq = tokens.shape[1]
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    valid = jnp.arange(seq)[None, :] < (lengths[:, None] - 1)
    return targets, valid


def token_loss(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, valid: jax.Array, chunk: int = 1024, shards: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Summed cross entropy of `targets` where `valid`, and the number of valid tokens, both fp32 scalars.

    hidden: `[batch, seq, d]` final (normed) hidden states; head: `[vocab, d]` the output embedding; targets: int
    and valid: bool, `[batch, seq]`. The sequence is cut into `shards` equal slices (the context-parallel split,
    so each device reads only its own) and each slice into chunks of `chunk` positions; one chunk per slice has
    logits at once.
    """
    batch, seq, dim = hidden.shape
    local = seq // shards
    chunk = max(1, min(chunk, local))
    n = -(-local // chunk)
    pad = n * chunk - local

    def split(x):  # [batch, seq, ...] -> [n, batch, shards, chunk, ...]
        x = x.reshape(batch, shards, local, *x.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(batch, shards, n, chunk, *x.shape[3:]), 2, 0)

    @jax.checkpoint
    def chunk_loss(h_c, t_c, v_c):
        logits = jnp.einsum("bscd,vd->bscv", h_c, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(v_c, lse - target, 0.0))

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (split(hidden), split(targets), split(valid)))
    return total, jnp.sum(valid).astype(jnp.float32)


def causal_lm_loss(
    hidden: jax.Array, head: jax.Array, tokens: jax.Array, lengths: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy and the number of predicted tokens, both fp32 scalars.

    hidden: `[batch, seq, d]` final (normed) hidden states; head: `[vocab, d]` the output embedding; tokens:
    int `[batch, seq]`; lengths: int `[batch]`, valid tokens per row (right-padded). Position t predicts token
    t + 1 for t + 1 < length. Divide the sum by the count for the mean; summing over micro-batches first gives the
    mean of the whole batch exactly.
    """
    return token_loss(hidden, head, *next_token_targets(tokens, lengths), chunk)
