"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs") as a KV-cache press: the turn's last query
ranks the cached tokens by its attention, averaged over every query head (one ranking for all KV heads), and
the last token is always kept. kvpress's `TOVAPress`: the same scores, `compression_ratio`'s meaning."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.methods import kv_press


@dataclasses.dataclass(frozen=True)
class TOVAPress(kv_press.UniformBudget):
    """`capacity` tokens kept per KV head (SCBench's budget), or kvpress's `compression_ratio` (fraction removed)."""

    capacity: int | None = kv_press.SCBENCH_CAPACITY
    compression_ratio: float | None = None
    window_size: int = dataclasses.field(default=1, init=False)  # the last query

    def scores(self, keys, valid, observation, layer, scale):
        """The last query's softmax attention over the cache, averaged over all heads, broadcast to every KV head;
        +inf for the newest slot. float32 `[batch, kv_heads, capacity]`."""
        per_group = kv_press.window_attention_scores(keys, valid, observation, layer, scale)  # [b, kv, capacity]
        shared = jnp.broadcast_to(jnp.mean(per_group, axis=1, keepdims=True), per_group.shape)
        return jnp.where(kv_press.newest(valid, 1)[:, None, :], jnp.inf, shared)
