"""How fast a batch-1 decode step's matrix-vector products can read their weights on this GPU: XLA's einsum
against the Pallas (Triton-lowered) GEMV of `lcjax.pallas.gemv`, for the Llama-3-8B shapes, weights stored
[out, in] as lcjax keeps them.

Each time is a kernel's own duration from a profiler trace (`benchmarks.timing.kernel_times`), not wall time: a
20-80 us kernel timed from Python would mostly measure dispatch. Four weight matrices are read in turn so each
call streams from HBM, not from L2. Also a plain read (a float32 sum of 1 GiB of bf16) for the read roofline.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python -m benchmarks.gemv
"""

from __future__ import annotations

import argparse
import functools
import itertools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import kernel_times
from lcjax.pallas.gemv import gemv

SHAPES = {  # name: (in, out) of one Llama-3-8B layer's projections, two of them as they would be if fused
    "q or o": (4096, 4096),
    "k or v": (4096, 1024),
    "q+k+v fused": (4096, 6144),
    "gate or up": (4096, 14336),
    "gate+up fused": (4096, 28672),
    "down": (14336, 4096),
}


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
            f = functools.partial(gemv, block_out=bo, block_in=bi, num_warps=warps, num_stages=stages)
            err = np.abs(np.asarray(jax.jit(f)(x, ws[0]), np.float32) - ref).max() / np.abs(ref).max()
            if err > 2e-2:
                raise AssertionError(f"gemv {name} {bo}/{bi}: relative error {err:.2e}")
            t = kernel_seconds(four(f), x, *ws)
            if best is None or t < best[0]:
                best = (t, f"block_out {bo}, block_in {bi}, {warps} warps, {stages} stages")
        print(
            f"| {name} {out}x{width} | Pallas GEMV, best of the configs ({best[1]}) | {best[0] * 1e6:.1f} | "
            f"{nbytes / best[0] / 1e9:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
