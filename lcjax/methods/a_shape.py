"""A-shape and Tri-shape sparse prefill (StreamingLLM's attention sinks + local window, as SCBench runs them).

A-shape (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", applied to prefill
in MInference/SCBench): every query sees the first `n_init` tokens and the `n_local` tokens ending at
itself. Tri-shape (SCBench, Li et al. 2024): A-shape plus the last `n_last` queries attending densely,
which keeps the query turn's view of the whole context. Defaults are SCBench's released settings.
Decode stays dense.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.methods.sparse_pattern import SparsePattern
from lcjax.methods.sparse_prefill import Backend, sparse_prefill


def a_shape_pattern(
    batch: int, heads: int, n_init: int, n_local: int, q_len: int, dense_last: int = 0
) -> SparsePattern:
    """Verticals 0..n_init-1 and slashes 0..n_local-1 for every head (clipped to q_len)."""
    n_init, n_local = min(n_init, q_len), min(n_local, q_len)
    vertical = jnp.broadcast_to(jnp.arange(n_init, dtype=jnp.int32), (batch, heads, n_init))
    slash = jnp.broadcast_to(jnp.arange(n_local, dtype=jnp.int32), (batch, heads, n_local))
    return SparsePattern(vertical=vertical, slash=slash, dense_last=min(dense_last, q_len))


@dataclasses.dataclass(frozen=True)
class AShape:
    """A-shape prefill: `n_init` sink tokens + an `n_local`-token window (SCBench: 128 + 3968)."""

    n_init: int = 128
    n_local: int = 3968
    backend: Backend = "auto"

    def pattern(self, q, k, meta) -> SparsePattern:
        return a_shape_pattern(q.shape[0], q.shape[2], self.n_init, self.n_local, q.shape[1])

    def __call__(self, q, k, v, cache, meta):
        return sparse_prefill(q, k, v, cache, meta, self.pattern, self.backend)


@dataclasses.dataclass(frozen=True)
class TriShape:
    """Tri-shape prefill: A-shape plus dense attention for the last `n_last` queries (SCBench: 100)."""

    n_init: int = 128
    n_local: int = 3968
    n_last: int = 100
    backend: Backend = "auto"

    def pattern(self, q, k, meta) -> SparsePattern:
        return a_shape_pattern(q.shape[0], q.shape[2], self.n_init, self.n_local, q.shape[1], self.n_last)

    def __call__(self, q, k, v, cache, meta):
        return sparse_prefill(q, k, v, cache, meta, self.pattern, self.backend)
