"""GPU probe: is the depth of the K/V ring what holds the block-sparse kernel back on short random lists?

Two earlier probes (2026-12-07, BENCHMARKS.md) ruled out K/V's layout and L2's reach at 128K 1%: lists whose
off-diagonal tiles all lie in 16 MiB of K/V per KV head ran no faster than lists over all 64 MiB, and only lists
within 8 MiB ran 5-7% faster. What is left is latency: with 128 x 128 tiles and two Q tiles, shared memory holds two
K/V slots, so while one slot is computed on at most one tile's copy is in flight. A tile's compute takes ~1.8 us
per SM; a copy that takes longer (an HBM miss under load) stalls the step.

Configurations (block_q, block_k, stages), each on its own lists at the same density:
- (128, 128, 2): the kept one (two Q tiles: the next item's Q loads during the current one);
- (128, 128, 3): three slots, which leaves room for one Q tile (the next item's Q waits for the output copy);
- (128, 64, 4) and (128, 64, 5): half-width tiles, 4 or 5 slots beside two Q tiles (256 or 320 keys in flight).

Prediction, written before the run: if the ring's depth bounds short lists, (128, 128, 3) runs 128K 1% >= 5% faster
than (128, 128, 2); if it moves by less than 3% (or is slower), depth is not the limit, or a single Q tile costs
what the third slot saves. The 128 x 64 rows tell the same from the other side (more copies in flight, smaller
wgmma N for QK^T); dense lists show what each costs where nothing waits for memory.

Every configuration is checked first against the fp32 XLA reference (2K at 10%, 1000 tokens dense). Kernel times
are medians of 10 after warm-up on fresh random inputs, two repetitions with the order of the configurations
reversed; rate = TFLOP/s over the computed tiles divided by cuDNN's dense rate in the same run.

    PYTHONPATH=. python3 -m experiments.probe_ring_depth [--lengths 8192,32768,131072]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from experiments.bench_sparse_kernels import SCALE, cudnn_case, log, qkv, random_block_lists, rel_err, timeit
from experiments.probe_kv_layout import canonical_case, kernel_fn, rate
from lcjax.pallas.block_sparse_attention import block_sparse_attention_reference, canonicalize_block_indices

CONFIGS = ((128, 128, 2), (128, 128, 3), (128, 64, 4), (128, 64, 5))
DENSITIES = (None, 0.01, 0.05, 0.1, 0.25)


def check(key, cfg, kernel) -> list[str]:
    """The configuration's kernel against the fp32 reference at 2K 10% and 1000 tokens dense."""
    bq, bk, _ = cfg
    lines = []
    for length, density in ((2048, 0.1), (1000, None)):
        q, k, v = qkv(jax.random.fold_in(key, length), length)
        idx, counts = random_block_lists(jax.random.fold_in(key, 5), length, bq, bk, density)
        ci, sc = canonicalize_block_indices(idx, counts, q_len=length, kv_len=length, block_q=bq, block_k=bk,
                                            causal=True)
        out = kernel(q, k, v, ci, sc)
        with jax.default_matmul_precision("highest"):
            ref = block_sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), idx, counts,
                                                   scale=SCALE, block_q=bq, block_k=bk)
        err, verdict = rel_err(out.astype(jnp.float32), ref)
        lines.append(f"{cfg} L={length} {density or 'dense'}: rel_err={err:.2e} {verdict}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    a = p.parse_args(argv)
    key = jax.random.key(int(time.time()))
    log(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    kernels = {cfg: kernel_fn(False, *cfg) for cfg in CONFIGS}  # one jit each: compiled once per shape
    checks = [line for cfg in CONFIGS for line in check(key, cfg, kernels[cfg])]
    for line in checks:
        log(line)
    if any("FAIL" in line for line in checks):
        raise SystemExit("a configuration disagrees with the reference")
    results = dict(checks=checks, cudnn={}, rows=[])
    for length in (int(x) for x in a.lengths.split(",")):
        results["cudnn"][length] = cudnn = cudnn_case(*qkv(jax.random.fold_in(key, 3), length))["tflops"]
        for density in DENSITIES:
            cases = {cfg: canonical_case(key, length, density, cfg[0], cfg[1]) for cfg in CONFIGS}
            times = {cfg: [] for cfg in CONFIGS}
            for order in (CONFIGS, CONFIGS[::-1]):
                for cfg in order:
                    times[cfg].append(timeit(kernels[cfg], *cases[cfg][0]) * 1e3)
            for cfg in CONFIGS:
                tiles = cases[cfg][1]
                row = dict(length=length, density=density, config=cfg, tiles=tiles, ms=times[cfg],
                           rate=[rate(tiles, t, cudnn, cfg[0], cfg[1]) for t in times[cfg]])
                results["rows"].append(row)
                log(row)
            del cases
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_ring_depth.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n| L | lists | {' | '.join(f'{c[0]}x{c[1]}, {c[2]} slots' for c in CONFIGS)} |")
    print("|---|---|" + "---|" * len(CONFIGS))
    for length in results["cudnn"]:
        for density in DENSITIES:
            rows = [r for r in results["rows"] if r["length"] == length and r["density"] == density]
            cells = [f"{r['ms'][0]:.3f} / {r['ms'][1]:.3f} ms, {max(r['rate']):.0%}" for r in rows]
            print(f"| {length // 1024}K | {'dense' if density is None else f'{density:.0%}'} | {' | '.join(cells)} |")
    print("cuDNN dense TFLOP/s:", {k: round(v) for k, v in results["cudnn"].items()})


if __name__ == "__main__":
    main()
