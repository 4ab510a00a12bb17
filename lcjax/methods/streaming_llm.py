"""StreamingLLM (Xiao et al. 2024) as a KV-cache press: keep the first tokens (attention sinks) and a window of
the most recent ones, drop the middle. SCBench's setting: 128 sinks + 3968 recent = 4096 tokens."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.methods import kv_press


@dataclasses.dataclass(frozen=True)
class StreamingLLMPress(kv_press.UniformBudget):
    """Keeps `n_sink` oldest and the newest tokens: `capacity` in all (SCBench), or a kvpress-style
    `compression_ratio` (fraction removed). kvpress's default n_sink is 4; SCBench's is 128."""

    capacity: int | None = kv_press.SCBENCH_CAPACITY
    compression_ratio: float | None = None
    n_sink: int = 128
    window_size: int = dataclasses.field(default=0, init=False)  # needs no queries

    def __post_init__(self):
        self._settle_budget("StreamingLLMPress")
        if self.n_sink < 0 or (self.capacity is not None and self.n_sink > self.capacity):
            raise ValueError(f"StreamingLLMPress: n_sink must be in [0, capacity], got {self.n_sink}.")

    def scores(self, keys, valid, observation, layer, scale):
        """+inf for sinks and recent slots; the middle ranks by recency (newer first) so any budget keeps the
        sinks and then the newest tokens."""
        slot = jnp.arange(valid.shape[1], dtype=jnp.float32)[None, :]
        score = jnp.where(kv_press.oldest(valid, self.n_sink), jnp.inf, slot)
        return jnp.broadcast_to(score[:, None, :], (valid.shape[0], keys.shape[2], valid.shape[1]))
