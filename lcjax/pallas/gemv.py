"""A batch-1 matrix-vector product as a Triton-lowered Pallas kernel, beside its XLA reference.

The peer of XLA's einsum for a decode step's projections (weights `[out, in]`, as lcjax stores them): one program
per `block_out` outputs walks `in` in `block_in` slices. `benchmarks.gemv` times both; the model uses XLA's
einsum, which read the weights as fast (BENCHMARKS.md, "Decode: matrix-vector products").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

ROWS = 16  # the vector is padded to 16 rows: Triton's dot needs M >= 16


def gemv(
    x: jax.Array,
    w: jax.Array,
    *,
    block_out: int,
    block_in: int,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """x `[m, in]` (m <= 16) times w `[out, in]` transposed -> `[m, out]` in x's dtype, float32 accumulation."""
    m, width = x.shape
    out = w.shape[0]
    if m > ROWS or out % block_out or width % block_in:
        raise ValueError(
            f"gemv: m={m} must be at most {ROWS}, out={out} a multiple of block_out={block_out}, "
            f"in={width} a multiple of block_in={block_in}."
        )

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xs, ws = x_ref[:, pl.ds(i * block_in, block_in)], w_ref[:, pl.ds(i * block_in, block_in)]
            return acc + jax.lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, width // block_in, body, jnp.zeros((ROWS, block_out), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    y = pl.pallas_call(
        kernel,
        grid=(out // block_out,),
        in_specs=[pl.BlockSpec((ROWS, width), lambda j: (0, 0)), pl.BlockSpec((block_out, width), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((ROWS, block_out), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((ROWS, out), x.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(jnp.pad(x, ((0, ROWS - m), (0, 0))), w)
    return y[:m]


def gemv_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """`gemv` in XLA: `x @ w.T` with float32 accumulation, in x's dtype."""
    return jnp.einsum("bd,fd->bf", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
