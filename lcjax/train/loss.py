"""The causal language-model loss, with fp32 logits computed a chunk of positions at a time.

At 32K tokens and a 49K vocabulary the logits alone are 6.4 GB in fp32; here they exist for `chunk` positions at
once, and under differentiation each chunk's gradient is computed beside its loss, so no logit is recomputed.
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
    embedding (the fp32 master weights: its gradient accumulates over chunks in fp32); targets: int and valid:
    bool, `[batch, seq]`. The sequence is cut into `shards` equal slices (the context-parallel split, so each
    device reads only its own) and each slice into chunks of `chunk` positions; one chunk per slice has logits
    at once.
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

    total = _chunked_cross_entropy(split(hidden), head, split(targets), split(valid))
    return total, jnp.sum(valid).astype(jnp.float32)


def _chunk_loss(h, w, targets, valid):
    """(summed cross entropy, fp32 logits `[..., vocab]`, their log-sum-exp `[...]`) of one chunk: h `[..., d]`
    and w `[vocab, d]` in the compute dtype, targets int and valid bool `[...]`."""
    logits = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - target, 0.0)), logits, lse


@jax.custom_vjp
def _chunked_cross_entropy(h: jax.Array, head: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Summed cross entropy over chunks: h `[n, ..., d]` in the compute dtype, head `[vocab, d]` (fp32 master
    weights, cast once to h's dtype for the products), targets int and valid bool `[n, ...]`.

    Differentiated, the forward pass also computes the gradient (the loss is a step's last value, so its
    cotangent only scales it): per chunk, the logits' gradient in h's dtype and its two products, with the head's
    gradient summed in fp32. Three vocabulary-sized products per chunk, not four (the backward would otherwise
    recompute the logits), nothing of `[..., vocab]` kept, and no product fed an fp32 operand (in bf16 training
    that would make it an fp32, TF32, matmul)."""
    w = head.astype(h.dtype)

    def body(total, xs):
        h_c, t_c, v_c = xs
        return total + _chunk_loss(h_c, w, t_c, v_c)[0], None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (h, targets, valid))
    return total


def _loss_and_grads(h, head, targets, valid):
    w = head.astype(h.dtype)

    def body(carry, xs):
        total, dhead = carry
        h_c, t_c, v_c = xs
        loss, logits, lse = _chunk_loss(h_c, w, t_c, v_c)
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        dlogits = jnp.where(v_c[..., None], jnp.exp(logits - lse[..., None]) - onehot, 0.0).astype(h.dtype)
        dh = jnp.einsum("...v,vd->...d", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
        dhead = dhead + jnp.einsum("...v,...d->vd", dlogits, h_c, preferred_element_type=jnp.float32)
        return (total + loss, dhead), dh

    zero = jnp.zeros(head.shape, jnp.float32)
    (total, dhead), dh = jax.lax.scan(body, (jnp.float32(0.0), zero), (h, targets, valid))
    return total, (dh, dhead.astype(head.dtype))


def _scaled_grads(residuals, g):
    dh, dhead = residuals
    return (g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), None, None


_chunked_cross_entropy.defvjp(_loss_and_grads, _scaled_grads)


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
