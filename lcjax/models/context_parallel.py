"""Context parallelism: a sequence split over the mesh's "context" axis, attention by gathering keys and values.

Causal attention gives late tokens more work than early ones, so a plain split would leave the first device
idle while the last one works. `load_balanced_order` lays the sequence out in 2C chunks and gives device r the
chunks r and 2C-1-r ("dual chunk"), so every device holds one early and one late chunk and does the same
work. The decoder is position-wise everywhere except attention and RoPE, which read explicit positions, so the
model runs on the permuted sequence unchanged; `ContextParallelAttention` masks by position, not by slot.

Keys and values are all-gathered along "context" (MaxText's "all_gather" strategy): per layer each device
receives the other devices' K/V, `2 * seq * kv_heads * head_dim` elements, small beside the attention it feeds
for GQA models. The local attention is `lcjax.numerics.positional_attention`, blocked XLA with an online softmax
that skips blocks no query can see.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lcjax.models.attention import AttentionMeta
from lcjax.numerics import positional_attention
from lcjax.sharding import axis_size, logical_to_spec


def load_balanced_order(seq: int, shards: int) -> np.ndarray:
    """int32 `[seq]`: the token order that gives each of `shards` consecutive slices one early and one late chunk.

    The sequence is cut into `2 * shards` chunks; slice r holds chunks r and `2 * shards - 1 - r`. `seq` must be
    a multiple of `2 * shards` (one shard: the identity)."""
    if shards == 1:
        return np.arange(seq, dtype=np.int32)
    if seq % (2 * shards):
        raise ValueError(f"a sequence of {seq} tokens does not split into 2 x {shards} equal chunks.")
    chunks = np.arange(seq, dtype=np.int32).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * shards - 1 - r]]) for r in range(shards)])


@dataclasses.dataclass(frozen=True)
class ContextParallelAttention:
    """Causal self-attention (no cache: training and scoring) over a sequence split along "context" of `mesh`.

    q, k, v and `meta.q_positions` arrive in any token order (`load_balanced_order` in training); a query sees
    the keys at positions up to its own and below its row's length. Batch and heads stay split as the logical
    rules place them (heads only when both query and KV heads divide over "tensor", so GQA groups stay whole).
    """

    mesh: Mesh
    q_chunk: int = 512
    k_chunk: int = 1024

    def __call__(self, q, k, v, cache, meta: AttentionMeta):
        if cache is not None or meta.phase != "prefill":
            raise ValueError("ContextParallelAttention runs without a cache (training and scoring).")
        tensor = axis_size(self.mesh, "q_heads")
        split_heads = q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0
        q_spec = logical_to_spec(q.shape, ("batch", "seq", "q_heads" if split_heads else None, None), self.mesh)
        kv_spec = logical_to_spec(k.shape, ("batch", "seq", "kv_heads" if split_heads else None, None), self.mesh)
        pos_spec = PartitionSpec(*q_spec[:2])
        gather = q_spec[1] is not None  # the sequence is split: every device needs every key

        def local(q, k, v, q_pos, lengths):
            k_pos = q_pos
            if gather:
                k, v, k_pos = (jax.lax.all_gather(x, "context", axis=1, tiled=True) for x in (k, v, q_pos))
            valid = k_pos < lengths[:, None]
            return positional_attention(
                q, k, v, q_pos, k_pos, valid, meta.scale, meta.sliding_window, self.q_chunk, self.k_chunk
            )

        run = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(q_spec, kv_spec, kv_spec, pos_spec, PartitionSpec(q_spec[0])),
            out_specs=q_spec,
            check_vma=False,
        )
        return run(q, k, v, meta.q_positions, meta.lengths), None
