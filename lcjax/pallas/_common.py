"""What every Pallas attention kernel here shares, whatever its backend: the exp2 domain and the running-max
floor of the online softmax, input checks, padding, and the split of calls too large for 32-bit offsets.

Logits are multiplied by `scale * log2(e)` once, so each element costs one exp2. Masked logits are -inf, but the
running max starts at a finite floor (`M_FLOOR`) instead of -inf: a row whose keys in a tile are all masked then
gets alpha = exp2(0) = 1 and p = exp2(-inf) = 0, never NaN; a row that never meets an allowed key ends with a
zero sum and is written as zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
M_FLOOR = -1e30
SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# Triton-lowered Pallas computes element offsets in int32: an operand of 2^31 elements or more (q at 1M
# tokens x 32 heads x 128) makes out-of-bounds addresses. Wrappers split such calls by KV-head groups.
MAX_KERNEL_ELEMENTS = 2**31 - 1


def by_head_groups(run, q: jax.Array, k: jax.Array, v: jax.Array, per_head, *, padded_len: int, padded_head_dim: int):
    """`run(q, k, v, per_head)` in slices of whole KV-head groups, each small enough that its padded q, k and
    v stay under `MAX_KERNEL_ELEMENTS`; outputs concatenated along heads. q `[batch, q_len, heads, d]`,
    k, v `[batch, kv_len, kv_heads, d]`; per_head: a pytree of arrays `[batch, heads, ...]` (or None)."""
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # elements of one group's q (or of its k, padded by at most one tile)
    per_group = batch * max(padded_len * group, k.shape[1] + 128) * padded_head_dim
    groups_per_call = max(1, MAX_KERNEL_ELEMENTS // per_group)
    if groups_per_call >= kv_heads:
        return run(q, k, v, per_head)
    outs = []
    for g0 in range(0, kv_heads, groups_per_call):
        g1 = min(kv_heads, g0 + groups_per_call)
        heads_slice = lambda x: x[:, g0 * group : g1 * group]  # per-head arrays: [batch, heads, ...]
        outs.append(
            run(q[:, :, g0 * group : g1 * group], k[:, :, g0:g1], v[:, :, g0:g1], jax.tree.map(heads_slice, per_head))
        )
    return jnp.concatenate(outs, axis=2)


def check_inputs(name: str, q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Shape/dtype checks shared by the kernels' wrappers; errors say what is supported."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{name} wants q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, kv_heads, "
            f"head_dim]; got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{name}: q {q.shape}, k {k.shape}, v {v.shape} must agree: k and v one shape, q their batch and head_dim."
        )
    head_dim = q.shape[3]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={head_dim} is not supported by {name}; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}."
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{name}: heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}.")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{name} takes q, k, v of one dtype among bfloat16, float16, float32; got {q.dtype}, {k.dtype}, {v.dtype}."
        )


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `axis` of x up to `size` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def padded_head_dim(head_dim: int) -> int:
    """Triton tiles need power-of-two sizes: head_dim 96 runs as 128 with zero-padded q, k, v."""
    return 1 << (head_dim - 1).bit_length()
