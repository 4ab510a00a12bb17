"""PyramidKV (Cai et al. 2024) as a KV-cache press: SnapKV's votes, but layer budgets that shrink linearly
with depth (lower layers attend broadly, upper layers to few tokens) at the same total as SnapKV.

Two budget schedules, chosen by how the budget is given:

- `capacity` (SCBench's `pyramidkv`): PyramidKV's released schedule. With B = capacity - window, the first layer
  keeps max = 2B - B // beta (+ window) and each next one (max - min) // (layers - 1) fewer, min = B // beta;
  when the prompt is no longer than max, max is the prompt and min is chosen to keep the total; prompts shorter
  than 2B keep the capacity in every layer.
- `compression_ratio` (kvpress's `PyramidKVPress`): kvpress's schedule, the window inside each budget. With
  C = n (1 - ratio) for n cached tokens, min = C / beta, max = 2C - min (max = n - window and min = 2C - max
  when that is more than the prompt leaves), layer l keeps round(max - l (max - min) / (layers - 1)); where
  n >= max >= min >= window fails, every layer keeps max(1, round(C)); a ratio of 0 keeps everything. Computed in
  float64 with Python's rounding, as kvpress does, by table lookup on the device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.methods import kv_press
from lcjax.methods.snapkv import SnapKVPress


@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    """SnapKV scoring with per-layer budgets; `capacity`/`compression_ratio` give the average per layer."""

    beta: int = 20

    def budgets(self, num_layers: int, n_valid: jax.Array, slots: int) -> jax.Array:
        if self.compression_ratio is not None:
            table = jnp.asarray(kvpress_budgets(slots, num_layers, self.compression_ratio, self.window_size, self.beta))
            return jnp.minimum(table[:, jnp.clip(n_valid, 0, slots)], n_valid[None, :])
        average = kv_press.kept_count(n_valid, self.capacity, None, slots)  # [batch]
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
        if self.compression_ratio is not None:
            table = kvpress_budgets(capacity, num_layers, self.compression_ratio, self.window_size, self.beta)
            return min(capacity, int(table.max()))
        average = kv_press.static_kept(capacity, self.capacity, self.compression_ratio)
        return min(capacity, 2 * max(average - self.window_size, 0) + self.window_size)


def kvpress_budgets(slots: int, num_layers: int, ratio: float, window: int, beta: int) -> np.ndarray:
    """int32 `[num_layers, slots + 1]`: kvpress's per-layer kept count for every cached length 0..slots (see the
    module docstring), in float64 as kvpress computes it."""
    n = np.arange(slots + 1, dtype=np.float64)
    if ratio == 0:
        return np.broadcast_to(n.astype(np.int32), (num_layers, slots + 1)).copy()
    spare = window + n * (1 - ratio) - window
    lo = spare / beta
    hi = spare * 2 - lo
    over = hi >= n - window
    hi = np.where(over, n - window, hi)
    lo = np.where(over, spare * 2 - hi, lo)
    pyramid = (n >= hi) & (hi >= lo) & (lo >= window)
    steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else np.zeros_like(hi)
    layer = np.arange(num_layers)[:, None]
    per_layer = np.rint(hi[None, :] - layer * steps[None, :])
    flat = np.maximum(1, np.rint(n * (1 - ratio)))
    return np.where(pyramid[None, :], per_layer, flat[None, :]).astype(np.int32)
