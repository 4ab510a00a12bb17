"""How fast a batch-1 decode step's matrix-vector products can read their weights on this GPU: XLA's einsum
against a Pallas (Triton-lowered) GEMV, for the Llama-3-8B shapes, weights stored [out, in] as lcjax keeps them.

Each time is a kernel's own duration from a profiler trace (`profile_decode.kernel_times`), not wall time: a
20-80 us kernel timed from Python would mostly measure dispatch. Four weight matrices are read in turn so each
call streams from HBM, not from L2. Also a plain read (a float32 sum of 1 GiB of bf16) for the read roofline.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python -m experiments.bench_gemv
"""

from __future__ import annotations

import argparse
import functools
import itertools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from experiments.profile_decode import kernel_times

SHAPES = {  # name: (in, out) of one Llama-3-8B layer's projections, two of them as they would be if fused
    "q or o": (4096, 4096), "k or v": (4096, 1024), "q+k+v fused": (4096, 6144), "gate or up": (4096, 14336),
    "gate+up fused": (4096, 28672), "down": (14336, 4096),
}
ROWS = 16  # the vector is padded to 16 rows: Triton's dot needs M >= 16


def pallas_gemv(x: jax.Array, w: jax.Array, *, block_out: int, block_in: int, num_warps: int = 4,
                num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """x `[m, in]` (m <= 16) times w `[out, in]` transposed -> `[m, out]` in x's dtype, float32 accumulation; one
    program per `block_out` outputs, walking `in` in `block_in` slices."""
    m, width = x.shape
    out = w.shape[0]
    if m > ROWS or out % block_out or width % block_in:
        raise ValueError(f"pallas_gemv: m={m} must be at most {ROWS}, out={out} a multiple of block_out={block_out}, "
                         f"in={width} a multiple of block_in={block_in}.")

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xs, ws = x_ref[:, pl.ds(i * block_in, block_in)], w_ref[:, pl.ds(i * block_in, block_in)]
            return acc + jax.lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        acc = jax.lax.fori_loop(0, width // block_in, body, jnp.zeros((ROWS, block_out), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    y = pl.pallas_call(
        kernel, grid=(out // block_out,),
        in_specs=[pl.BlockSpec((ROWS, width), lambda j: (0, 0)), pl.BlockSpec((block_out, width), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((ROWS, block_out), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((ROWS, out), x.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret=interpret,
    )(jnp.pad(x, ((0, ROWS - m), (0, 0))), w)
    return y[:m]


def kernel_seconds(fn, *args, reps: int = 5) -> float:
    """Mean duration of the longest-running kernel `fn` launches, from a profiler trace of `reps` calls."""
    jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    totals, _ = kernel_times(trace_dir)
    calls, ns = max(totals.values(), key=lambda v: v[1])
    return ns / calls * 1e-9


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    a = p.parse_args(argv)
    key = jax.random.key(0)
    big = jax.random.normal(key, (1 << 29,), jnp.bfloat16)
    t = kernel_seconds(jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32)), big)
    print(f"read roofline: a float32 sum of 1 GiB of bf16 reads {big.nbytes / t / 1e9:.0f} GB/s")
    del big
    print("| weights [out, in] | implementation | us | GB/s |\n|---|---|---|---|")
    for name in a.shapes.split(","):
        width, out = SHAPES[name]
        x = jax.random.normal(key, (1, width), jnp.bfloat16)
        ws = [0.02 * jax.random.normal(jax.random.fold_in(key, i), (out, width), jnp.bfloat16) for i in range(4)]
        nbytes = out * width * 2
        ref = np.asarray(x, np.float32) @ np.asarray(ws[0], np.float32).T
        four = lambda f: jax.jit(lambda x, *w: [f(x, wi) for wi in w])  # each call reads another matrix
        t = kernel_seconds(four(lambda x, w: jnp.einsum("bd,fd->bf", x, w)), x, *ws)
        print(f"| {name} {out}x{width} | XLA einsum | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} |", flush=True)
        best = None
        for bo, bi, warps, stages in itertools.product((32, 64), (256, 512), (4, 8), (3, 4)):
            if out % bo or width % bi or bo * bi * 2 * stages > 160 * 1024:  # Triton's pipeline must fit in smem
                continue
            f = functools.partial(pallas_gemv, block_out=bo, block_in=bi, num_warps=warps, num_stages=stages)
            err = np.abs(np.asarray(jax.jit(f)(x, ws[0]), np.float32) - ref).max() / np.abs(ref).max()
            if err > 2e-2:
                raise AssertionError(f"pallas_gemv {name} {bo}/{bi}: relative error {err:.2e}")
            t = kernel_seconds(four(f), x, *ws)
            if best is None or t < best[0]:
                best = (t, f"block_out {bo}, block_in {bi}, {warps} warps, {stages} stages")
        print(f"| {name} {out}x{width} | Pallas GEMV, best of the configs ({best[1]}) | {best[0] * 1e6:.1f} | "
              f"{nbytes / best[0] / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
