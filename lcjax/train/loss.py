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

    hidden: `[batch, seq, d]` final (normed) hidden states in the compute dtype; head: `[vocab, d]` the output
    embedding (the fp32 master weights: its gradient accumulates over chunks in their dtype); targets: int and
    valid: bool, `[batch, seq]`. The sequence is cut into `shards` equal slices (the context-parallel split,
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

    def chunk_loss(h_c, t_c, v_c):
        return _chunk_cross_entropy(h_c, head, t_c, v_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (split(hidden), split(targets), split(valid)))
    return total, jnp.sum(valid).astype(jnp.float32)


@jax.custom_vjp
def _chunk_cross_entropy(h: jax.Array, head: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Summed cross entropy of one chunk: h `[..., d]` in the compute dtype, head `[vocab, d]` (fp32 master weights,
    cast to h's dtype for the product), targets int and valid bool `[...]`; fp32 logits and statistics.

    The backward pass recomputes the logits (nothing of `[..., vocab]` is kept) and runs its two products with
    the logits' gradient in h's dtype: in bf16 training an fp32 gradient would turn them into fp32 (TF32) matmuls,
    a quarter of the step's time at a 128K vocabulary. The head's gradient is returned in fp32, so the sum over
    chunks accumulates in fp32."""
    logits = jnp.einsum("...d,vd->...v", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - target, 0.0))


def _chunk_forward(h, head, targets, valid):
    return _chunk_cross_entropy(h, head, targets, valid), (h, head, targets, valid)


def _chunk_backward(residuals, g):
    h, head, targets, valid = residuals
    w = head.astype(h.dtype)
    logits = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    dlogits = (g * jnp.where(valid[..., None], probs - onehot, 0.0)).astype(h.dtype)
    dh = jnp.einsum("...v,vd->...d", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dhead = jnp.einsum("...v,...d->vd", dlogits, h, preferred_element_type=jnp.float32)
    return dh, dhead.astype(head.dtype), None, None


_chunk_cross_entropy.defvjp(_chunk_forward, _chunk_backward)


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
