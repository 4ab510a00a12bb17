"""The causal language-model loss, with fp32 logits computed a chunk of positions at a time.

At 32K tokens and a 49K vocabulary the logits alone are 6.4 GB in fp32; here they exist for `chunk` positions at
once, in the forward pass and (each chunk recomputed under `jax.checkpoint`) in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_lm_loss(
    hidden: jax.Array, head: jax.Array, tokens: jax.Array, lengths: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy and the number of predicted tokens, both fp32 scalars.

    hidden: `[batch, seq, d]` final (normed) hidden states; head: `[vocab, d]` the output embedding; tokens:
    int `[batch, seq]`; lengths: int `[batch]`, valid tokens per row (right-padded). Position t predicts token
    t + 1 for t + 1 < length. Divide the sum by the count for the mean; summing over micro-batches first gives the
    mean of the whole batch exactly.
    """
    batch, seq, dim = hidden.shape
    h, targets = hidden[:, :-1], tokens[:, 1:]
    valid = jnp.arange(seq - 1)[None, :] < (lengths[:, None] - 1)
    chunk = max(1, min(chunk, seq - 1))
    n = -(-(seq - 1) // chunk)
    pad = n * chunk - (seq - 1)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(h_c, t_c, v_c):
        logits = jnp.einsum("bcd,vd->bcv", h_c, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(v_c, lse - target, 0.0))

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (split(h), split(targets), split(valid)))
    return total, jnp.sum(valid).astype(jnp.float32)
