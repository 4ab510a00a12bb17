"""Where a decode step's GPU time goes: traces `lcjax.generate`'s jitted decode loop on a Llama-3-8B-shaped model
(random bf16 weights) and sums the GPU kernels' time by kernel name (XLA fusion or Pallas kernel).

Prints the step time (median of 3 untraced loops, wall clock), then for one traced loop: the GPU span, the time
kernels were running, and a table of kernels by time per step. Tracing stretches the span (gaps between
kernels), not the kernels' own durations, which is why busy time per step is the figure to compare.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python -m benchmarks.profile_decode --batch 1 --context 4096

`--cache kivi` (or another SCBench cache-method name) profiles the decode loop over that method's cache.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import kernel_times
from lcjax.config import llama3_8b_config
from lcjax.generate import _bucket, _decode_loop, _token_buffer
from lcjax.methods import cache_method
from lcjax.models.attention import DenseAttention
from lcjax.models.transformer import Transformer
from lcjax.sampling import Greedy


def fusion_ops(hlo: str, name: str) -> str:
    """The distinct HLO opcodes inside fusion `name` of the compiled module text (best effort; "" if not a
    fusion, e.g. a Pallas kernel)."""
    for hlo_name in (name, re.sub(r"_(\d+)$", r".\1", name)):  # the profiler writes "fusion.12" as "fusion_12"
        called = re.search(rf"%{re.escape(hlo_name)} = .*?calls=%([\w.\-]+)", hlo)
        if called:
            break
    else:
        return ""
    body = re.search(rf"%{re.escape(called.group(1))} [^{{]*\{{(.*?)\n\}}", hlo, re.S)
    if not body:
        return ""
    ops = re.findall(r"= [^=]*?\s([a-z][a-z0-9\-]*)\(", body.group(1))
    skip = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "broadcast", "convert", "reshape"}
    return ",".join(dict.fromkeys(op for op in ops if op not in skip))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new", type=int, default=32, help="tokens per decode loop")
    p.add_argument("--rows", type=int, default=25, help="kernels listed")
    p.add_argument("--cache", default="dense", help="cache method (SCBench name): dense, kivi, quest, ...")
    a = p.parse_args(argv)
    cfg = llama3_8b_config()
    model = Transformer.init(
        cfg, jax.random.key(0), dtype=jnp.bfloat16, attention=DenseAttention(decode="auto")
    ).with_layer_layout("unstacked")
    model = model.with_transforms(cache_transform=cache_method(a.cache) or "dense")
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.context)), jnp.int32)
    logits, cache = model.prefill(prompt, capacity=_bucket(a.context + a.new), logits="last")
    first = jax.block_until_ready(jnp.argmax(logits, -1).astype(jnp.int32))
    fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, cache))  # the loop donates its cache

    def run(seed, c):
        return jax.block_until_ready(
            _decode_loop(
                model, first, c, jax.random.key(seed), jnp.int32(a.new), _token_buffer(a.new), (), Greedy(), None
            )
        )

    run(0, fresh())
    hlo = (
        _decode_loop.lower(
            model, first, fresh(), jax.random.key(0), jnp.int32(a.new), _token_buffer(a.new), (), Greedy(), None
        )
        .compile()
        .as_text()
    )
    times = []
    for i in range(3):
        c = fresh()
        t0 = time.perf_counter()
        run(1 + i, c)
        times.append(time.perf_counter() - t0)
    step_ms = statistics.median(times) / a.new * 1e3
    with tempfile.TemporaryDirectory() as trace_dir:
        c = fresh()
        jax.profiler.start_trace(trace_dir)
        run(9, c)
        jax.profiler.stop_trace()
        totals, span = kernel_times(trace_dir)
    busy = sum(t for _, t in totals.values())
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {a.batch} x {a.context}, {a.new} tokens, "
        f"{a.cache} cache"
    )
    print(
        f"step {step_ms:.3f} ms (untraced, median of 3 loops); traced: kernels busy {busy / 1e6 / a.new:.3f} ms "
        f"per step over a span of {span / 1e6 / a.new:.3f} ms"
    )
    print("\n| kernel | HLO ops fused | calls per step | us per call | us per step | share of busy |")
    print("|---|---|---|---|---|---|")
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[: a.rows]:
        print(
            f"| {name[:60]} | {fusion_ops(hlo, name)} | {n / a.new:.1f} | {t / n / 1e3:.1f} | {t / a.new / 1e3:.1f} | "
            f"{t / busy:.1%} |"
        )


if __name__ == "__main__":
    main()
