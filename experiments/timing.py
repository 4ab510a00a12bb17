"""Timing shared by the GPU benchmarks."""

from __future__ import annotations

import statistics
import time

import jax

# the H100's device-to-device copy bandwidth, bytes read + written (../shared/KERNELS.md): the memory roofline
COPY_GBS = 2972.0


def median_seconds(fn, *args, samples: int = 10) -> float:
    """Median wall time of `fn(*args)` (blocked until ready) over `samples` calls, after a compile call and a
    warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
