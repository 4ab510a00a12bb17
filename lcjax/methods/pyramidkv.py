"""PyramidKV (Cai et al. 2024) as a KV-cache press: SnapKV's votes, but layer budgets that shrink linearly
with depth (lower layers attend broadly, upper layers to few tokens) at the same total as SnapKV.

Budgets follow PyramidKV's released schedule: with B = budget - window, the first layer keeps
max = 2B - B // beta (+ window) and each next one (max - min) // (layers - 1) fewer, min = B // beta; when the
prompt is no longer than max, max is the prompt and min is chosen to keep the total; prompts shorter than 2B
keep the average budget in every layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.methods import kv_press
from lcjax.methods.snapkv import SnapKVPress


@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    """SnapKV scoring with per-layer budgets; `capacity`/`compression_ratio` give the average per layer."""

    beta: int = 20

    def budgets(self, num_layers: int, n_valid: jax.Array) -> jax.Array:
        average = kv_press.kept_count(n_valid, self.capacity, self.compression_ratio)  # [batch]
        w = self.window_size
        spare = jnp.maximum(average - w, 0)
        lo = spare // self.beta
        hi = 2 * spare - lo
        over = hi >= n_valid - w  # the prompt is shorter than the top budget
        hi = jnp.where(over, jnp.maximum(n_valid - w, 0), hi)
        lo = jnp.where(over, 2 * spare - hi, lo)
        step = (hi - lo) // max(num_layers - 1, 1)
        layer = jnp.arange(num_layers, dtype=jnp.int32)[:, None]
        pyramid = hi[None, :] - layer * step[None, :] + w
        # prompts shorter than twice the spare budget keep the average in every layer, as PyramidKV does
        uniform = (n_valid < 2 * spare)[None, :]
        return jnp.minimum(jnp.where(uniform, average[None, :], pyramid), n_valid[None, :])

    def max_budget(self, num_layers: int, capacity: int) -> int:
        average = kv_press.static_kept(capacity, self.capacity, self.compression_ratio)
        return min(capacity, 2 * max(average - self.window_size, 0) + self.window_size)
