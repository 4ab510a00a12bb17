"""The one timing helper of the GPU benchmarks: wall-clock medians and per-kernel times from a profiler trace."""

from __future__ import annotations

import collections
import glob
import statistics
import time

import jax
from jax.profiler import ProfileData

# The H100's device-to-device copy bandwidth, bytes read + written (BENCHMARKS.md, "Device ceilings"): the
# memory roofline every "of roofline" and GB/s column is measured against.
COPY_GBS = 2972.0


def median_seconds(fn, *args, samples: int = 10, warmup: int = 2, min_sample_s: float = 0.0) -> float:
    """Median wall time of `fn(*args)`, blocked until ready, over `samples` samples after `warmup` calls (the first
    compiles). A sample runs the call back to back enough times to last `min_sample_s` (kernels of a few
    microseconds), and reports the time per call. `fn` may take no arguments and draw fresh inputs itself."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
    reps = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-6))) if warmup and min_sample_s else 1
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def kernel_times(trace_dir: str) -> tuple[dict[str, list], int]:
    """{kernel name: [calls, total ns]} over the GPU planes' stream lines of the `jax.profiler` trace in trace_dir,
    and the span in ns from the first kernel's start to the last one's end (a 20-80 us kernel timed from Python
    would mostly measure dispatch)."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    totals: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    start, end = None, None
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():  # the other lines regroup the same kernels by XLA op
                continue
            for ev in line.events:
                totals[ev.name][0] += 1
                totals[ev.name][1] += ev.duration_ns
                start = ev.start_ns if start is None else min(start, ev.start_ns)
                end = ev.start_ns + ev.duration_ns if end is None else max(end, ev.start_ns + ev.duration_ns)
    if start is None:
        raise RuntimeError("the trace holds no GPU kernels: kernel_times needs a GPU")
    return totals, end - start
