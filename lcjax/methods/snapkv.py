"""SnapKV (Li et al. 2024) as a KV-cache press: the last `window_size` queries of a turn vote for the cached
tokens they attend to; votes are smoothed by average pooling (`kernel_size`) and each KV head keeps its
top tokens plus the window itself (votes are pooled over the tokens before the window). SCBench's setting:
window 32, kernel 5, 4096 tokens kept; given kvpress's `compression_ratio` instead, kvpress's window (64) is the
default, so kvpress's arguments give kvpress's result.

GQA: the query heads of a group vote together (scores averaged over the group, as in kvpress), so the cache
keeps one set per KV head and stays GQA-sized.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.methods import kv_press


@dataclasses.dataclass(frozen=True)
class SnapKVPress(kv_press.UniformBudget):
    """`capacity` tokens kept per KV head (SCBench), or kvpress's `compression_ratio` (fraction removed)."""

    capacity: int | None = kv_press.SCBENCH_CAPACITY
    compression_ratio: float | None = None
    window_size: int | None = None  # SCBench's 32 with a capacity, kvpress's 64 with a compression_ratio
    kernel_size: int = 5

    def __post_init__(self):
        self._settle_budget(type(self).__name__)
        if self.window_size is None:
            object.__setattr__(self, "window_size", 32 if self.compression_ratio is None else 64)
        if self.window_size < 1 or self.kernel_size < 1:
            raise ValueError(
                f"{type(self).__name__}: window_size and kernel_size must be >= 1, got "
                f"{self.window_size} and {self.kernel_size}."
            )

    def scores(self, keys, valid, observation, layer, scale):
        window = kv_press.newest(valid, self.window_size)[:, None, :]
        votes = kv_press.window_attention_scores(keys, valid, observation, layer, scale)
        # pooled over the tokens before the window only (the window is kept anyway), as SnapKV does
        votes = kv_press.pool_scores(jnp.where(window, 0.0, votes), self.kernel_size)
        return jnp.where(window, jnp.inf, votes)
