"""Knorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression") as a
KV-cache press: each KV head keeps the keys of smallest L2 norm (low-norm keys draw high attention). Needs no
queries. kvpress's `KnormPress`: the same scores (the negated norm, in float32), `compression_ratio`'s meaning."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.methods import kv_press


@dataclasses.dataclass(frozen=True)
class KnormPress(kv_press.UniformBudget):
    """`capacity` tokens kept per KV head (SCBench's budget), or kvpress's `compression_ratio` (fraction removed)."""

    capacity: int | None = kv_press.SCBENCH_CAPACITY
    compression_ratio: float | None = None
    window_size: int = dataclasses.field(default=0, init=False)  # needs no queries

    def scores(self, keys, valid, observation, layer, scale):
        """-||k|| per slot and KV head, float32 `[batch, kv_heads, capacity]`."""
        return -jnp.swapaxes(jnp.linalg.norm(keys.astype(jnp.float32), axis=-1), 1, 2)
