"""GPU benchmark: lcjax's block-sparse and vertical-slash Pallas kernels against cuDNN dense attention.

Causal prefill, batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16. In order: (a) correctness against
the XLA references on a small size with fresh random inputs and NaN-poisoned outputs; (b) a sweep of tile
sizes / warps / pipeline stages at one length; (c) per length: cuDNN, tokamax (when installed), block-sparse
(the Mosaic GPU and the Triton kernel) at 1/5/10/25 % of the causal tiles and dense (all causal tiles),
vertical-slash (1000 verticals / 6096 slashes) on the ideal nearest-diagonals index set and on random indices.
Times are medians of >= 10 samples after warm-up; TFLOP/s count the FLOPs of the tiles each kernel computes
(4 * tile_q * tile_k * head_dim per tile; cuDNN: 4 * heads * L^2 / 2 * head_dim). Block-sparse rows also give the
bytes the kernel must move when no tile is reused (K and V per listed tile, Q and O per query block) per second,
against the measured copy bandwidth (`benchmarks.timing.COPY_GBS`): random short lists are bandwidth-bound. A
markdown table comes last; full results go to $OUT/bench_sparse.json.

    export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
    PYTHONPATH=. python3 -m benchmarks.sparse_kernels [--lengths 8192,32768,131072] [--sweep after]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import COPY_GBS, median_seconds
from lcjax.pallas.block_sparse_attention import _pallas_forward as block_sparse_forward
from lcjax.pallas.block_sparse_attention import (
    block_sparse_attention_canonical,
    block_sparse_attention_reference,
    canonicalize_block_indices,
)
from lcjax.pallas.block_sparse_attention_mgpu import block_sparse_attention_mgpu
from lcjax.pallas.dispatch import block_sparse_attention
from lcjax.pallas.vertical_slash_attention import _pallas_forward as vertical_slash_forward
from lcjax.pallas.vertical_slash_attention import (
    build_vertical_slash_index,
    vertical_slash_attention,
    vertical_slash_attention_reference,
)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM**-0.5
DENSITIES = (0.01, 0.05, 0.10, 0.25)
N_VERTICAL, N_SLASH = 1000, 6096
# block_q, block_k, num_warps, num_stages, heads_fastest (grid order); the first is the default
# (docs/kernel-notes.md: 64x64 tiles on 8 warps, 64x128 tiles, 128-wide vertical-slash tiles on 4 warps and 3
# stages for 64-wide vertical-slash tiles were all slower; heads_fastest=1 lost to 0 on every pair tried)
BS_CONFIGS = [(128, 64, 4, 2, 0), (128, 64, 4, 2, 1), (128, 64, 4, 3, 0), (128, 64, 8, 2, 0), (128, 128, 8, 2, 0)]
VS_CONFIGS = [(128, 8, 2, 0), (128, 8, 3, 0), (64, 4, 2, 0)]  # block, warps, stages, heads_fastest
# the Mosaic GPU (Hopper) block-sparse kernel: block_q, block_k, stages (a first H100 probe: 128 x 128 tiles with
# two compute warpgroups ran 600 TFLOP/s on dense lists at 32K; 128 x 64 519; 64 x 64 with one warpgroup 380)
MOSAIC_CONFIG = (128, 128, 2)
START = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - START:6.1f}s]", *a, flush=True)


def timeit(fn, *args, samples: int = 10) -> float:
    """Median seconds per call: compile, one warm-up, then samples of back-to-back calls lasting >= 5 ms."""
    return median_seconds(fn, *args, samples=samples, min_sample_s=0.005)


def qkv(key, length):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (1, length, HEADS, HEAD_DIM), jnp.bfloat16),
        jax.random.normal(kk, (1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16),
        jax.random.normal(kv, (1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16),
    )


def random_block_lists(key, length: int, block_q: int, block_k: int, density: float | None, span: int | None = None):
    """Per (head, query block i): round(density * causal blocks) distinct key blocks drawn among the causal
    ones, the diagonal always kept; density None = every causal block. With `span`, the blocks other than the
    diagonal are drawn among key blocks [0, span) only (lists capped at what that leaves). Returns int32
    indices `[1, heads, nqb, max_blocks]` and counts `[1, heads, nqb]`."""
    nqb, nkb = -(-length // block_q), -(-length // block_k)
    last = (np.arange(nqb) * block_q + block_q - 1) // block_k  # last causal key block per query block
    if density is None:
        counts = np.broadcast_to(last + 1, (1, HEADS, nqb))
        return jnp.broadcast_to(jnp.arange(nkb, dtype=jnp.int32), (1, HEADS, nqb, nkb)), jnp.asarray(counts)
    pool = last if span is None else np.minimum(span, last)  # off-diagonal blocks to draw from: [0, pool)
    want = np.minimum(np.maximum(1, np.round(density * (last + 1))), pool + 1).astype(np.int32)
    max_blocks = int(want.max())
    scores = jax.random.uniform(key, (1, HEADS, nqb, nkb))
    j = jnp.arange(nkb)
    scores = jnp.where(j == jnp.asarray(last)[:, None], -1.0, jnp.where(j < jnp.asarray(pool)[:, None], scores, 2.0))
    idx = jnp.argsort(scores, axis=-1)[..., :max_blocks].astype(jnp.int32)
    return idx, jnp.asarray(np.broadcast_to(want, (1, HEADS, nqb)))


def vs_pattern(key, length: int, kind: str):
    nv, ns = min(N_VERTICAL, length), min(N_SLASH, length)
    if kind == "nearest":  # MInference's ideal case: first columns, nearest diagonals
        v = jnp.broadcast_to(jnp.arange(nv, dtype=jnp.int32), (1, HEADS, nv))
        s = jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), (1, HEADS, ns))
        return v, s
    kv_, ks = jax.random.split(key)
    perm = lambda k, n: jax.vmap(lambda kk: jax.random.permutation(kk, length)[:n])(jax.random.split(k, HEADS))
    return perm(kv_, nv)[None].astype(jnp.int32), perm(ks, ns)[None].astype(jnp.int32)


def rel_err(out, ref):
    """‖out - ref‖ / ‖ref‖ and a verdict (bf16 operands: under 1e-2, every element finite)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    finite = bool(np.isfinite(out).all())
    return err, f"finite={finite} {'OK' if finite and err < 1e-2 else 'FAIL'}"


def check_correctness(key, lengths=(2048, 1000)) -> list[str]:
    """Kernels vs the XLA references (fp32 inputs upcast, highest matmul precision); poisoned outputs."""
    lines = []
    for length in lengths:
        key, kx, ki = jax.random.split(key, 3)
        q, k, v = qkv(kx, length)
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        for density in (0.1, None):
            bq, bk = MOSAIC_CONFIG[:2]
            idx, counts = random_block_lists(ki, length, bq, bk, density)
            out = block_sparse_attention(
                q, k, v, idx, counts, scale=SCALE, block_q=bq, block_k=bk, implementation="mosaic"
            )
            with jax.default_matmul_precision("highest"):
                ref = block_sparse_attention_reference(*up, idx, counts, scale=SCALE, block_q=bq, block_k=bk)
            err, verdict = rel_err(out.astype(jnp.float32), ref)
            lines.append(
                f"block_sparse mosaic {bq}x{bk} L={length} density={density or 'dense'}: rel_err={err:.2e} {verdict}"
            )
            idx, counts = random_block_lists(ki, length, 64, 64, density)
            out = block_sparse_attention(q, k, v, idx, counts, scale=SCALE, implementation="triton")
            with jax.default_matmul_precision("highest"):
                ref = block_sparse_attention_reference(*up, idx, counts, scale=SCALE)
            err, verdict = rel_err(out.astype(jnp.float32), ref)
            lines.append(f"block_sparse triton L={length} density={density or 'dense'}: rel_err={err:.2e} {verdict}")
            if length % 64 == 0:
                ci, sc = canonicalize_block_indices(
                    idx, counts, q_len=length, kv_len=length, block_q=64, block_k=64, causal=True
                )
                poisoned = block_sparse_forward(
                    q,
                    k,
                    v,
                    ci,
                    sc,
                    kv_len=length,
                    scale=SCALE,
                    causal=True,
                    block_q=64,
                    block_k=64,
                    interpret=False,
                    num_warps=None,
                    num_stages=None,
                    out_init=jnp.full(q.shape, jnp.nan, q.dtype),
                )
                same = bool(jnp.array_equal(poisoned, out))
                lines.append(f"  poisoned output: all written and equal to the plain call: {same}")
        for kind in ("nearest", "random"):
            key, kp = jax.random.split(key)
            verticals, slashes = vs_pattern(kp, length, kind)
            verticals, slashes = verticals[..., :100], slashes[..., :300]
            index = build_vertical_slash_index(verticals, slashes, length)
            out = vertical_slash_attention(q, k, v, index, scale=SCALE)
            with jax.default_matmul_precision("highest"):
                ref = vertical_slash_attention_reference(*up, verticals, slashes, SCALE)
            err, verdict = rel_err(out.astype(jnp.float32), ref)
            lines.append(f"vertical_slash L={length} {kind} (100 v / 300 s): rel_err={err:.2e} {verdict}")
            if length % 64 == 0:
                poisoned = vertical_slash_forward(
                    q,
                    k,
                    v,
                    index,
                    scale=SCALE,
                    interpret=False,
                    num_warps=None,
                    num_stages=None,
                    out_init=jnp.full(q.shape, jnp.nan, q.dtype),
                )
                lines.append(f"  poisoned output: all written and equal: {bool(jnp.array_equal(poisoned, out))}")
    for line in lines:
        log(line)
    return lines


def block_sparse_case(q, k, v, idx, counts, cfg):
    """Times the canonicalising pre-pass and the kernel on canonical lists; returns a result dict. cfg: a
    Triton config (block_q, block_k, warps, stages, heads_fastest) or a Mosaic one (block_q, block_k, stages)."""
    bq, bk = cfg[:2]
    length = q.shape[1]
    canon = jax.jit(
        lambda i, c: canonicalize_block_indices(i, c, q_len=length, kv_len=length, block_q=bq, block_k=bk, causal=True)
    )
    ci, sc = canon(idx, counts)
    tiles = int(jnp.sum(sc[..., 1]))
    if len(cfg) == 3:
        kern = jax.jit(
            lambda q, k, v, i, s: block_sparse_attention_mgpu(
                q, k, v, i, s, scale=SCALE, block_q=bq, block_k=bk, stages=cfg[2]
            )
        )
    else:
        _, _, warps, stages, heads_fastest = cfg
        kern = jax.jit(
            lambda q, k, v, i, s: block_sparse_attention_canonical(
                q,
                k,
                v,
                i,
                s,
                scale=SCALE,
                block_q=bq,
                block_k=bk,
                num_warps=warps,
                num_stages=stages,
                heads_fastest=bool(heads_fastest),
            )
        )
    t_kernel = timeit(kern, q, k, v, ci, sc)
    t_prep = timeit(canon, idx, counts)
    nqb = -(-length // bq)
    causal_tiles = HEADS * sum(min(((i * bq + bq - 1) // bk) + 1, -(-length // bk)) for i in range(nqb))
    flops = 4 * bq * bk * HEAD_DIM * tiles
    # bytes the kernel must move if no tile is reused from L2: a K and a V tile per listed tile, each query
    # block's Q read and O written once
    moved = (2 * bk * tiles + 2 * bq * HEADS * nqb) * HEAD_DIM * q.dtype.itemsize
    return dict(
        kernel_ms=t_kernel * 1e3,
        prep_ms=t_prep * 1e3,
        tflops=flops / t_kernel / 1e12,
        tile_frac=tiles / causal_tiles,
        flops=flops,
        gbps=moved / t_kernel / 1e9,
    )


def vertical_slash_case(q, k, v, verticals, slashes, cfg):
    block, warps, stages, heads_fastest = cfg
    length = q.shape[1]
    build = jax.jit(lambda vv, ss: build_vertical_slash_index(vv, ss, length, block, block))
    index = build(verticals, slashes)
    tiles = int(jnp.sum(index.plain_counts) + jnp.sum(index.masked_counts))
    chunks = int(jnp.sum((index.column_counts + block - 1) // block))
    kern = jax.jit(
        lambda q, k, v, ix: vertical_slash_attention(
            q, k, v, ix, scale=SCALE, num_warps=warps, num_stages=stages, heads_fastest=bool(heads_fastest)
        )
    )
    t_kernel = timeit(kern, q, k, v, index)
    t_build = timeit(build, verticals, slashes)
    nqb = -(-length // block)
    flops = 4 * block * block * HEAD_DIM * (tiles + chunks)
    return dict(
        kernel_ms=t_kernel * 1e3,
        prep_ms=t_build * 1e3,
        tflops=flops / t_kernel / 1e12,
        tile_frac=(tiles + chunks) / (HEADS * nqb * (nqb + 1) / 2),
        flops=flops,
        masked_tiles=int(jnp.sum(index.masked_counts)),
        column_chunks=chunks,
    )


def dense_row(length: int, seconds: float) -> dict:
    """The result dict of a dense causal kernel that took `seconds` at `length` (FLOPs of the causal half)."""
    flops = 4 * HEADS * length**2 / 2 * HEAD_DIM
    return dict(kernel_ms=seconds * 1e3, prep_ms=0.0, tflops=flops / seconds / 1e12, tile_frac=1.0, flops=flops)


def cudnn_case(q, k, v):
    fn = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=SCALE, is_causal=True, implementation="cudnn")
    )
    return dense_row(q.shape[1], timeit(fn, q, k, v))


def tokamax_case(q, k, v):
    """tokamax's Mosaic GPU flash attention (dense causal), the fastest dense kernel measured on this H100
    (BENCHMARKS.md); None when tokamax is not installed. Also its relative difference to cuDNN."""
    try:
        import tokamax
    except ImportError as e:
        log(f"tokamax not importable ({e}); no tokamax row")
        return None
    fn = jax.jit(
        lambda q, k, v: tokamax.dot_product_attention(q, k, v, scale=SCALE, is_causal=True, implementation="mosaic")
    )
    t = timeit(fn, q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v, scale=SCALE, is_causal=True, implementation="cudnn")
    err = float(jnp.linalg.norm((fn(q, k, v) - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    log(f"tokamax vs cuDNN at L={q.shape[1]}: rel diff {err:.1e}")
    return dense_row(q.shape[1], t)


def sweep(key, length: int, budget_s: float):
    """Tries each config on dense and 10 % block lists and on the nearest-diagonals vertical-slash set."""
    q, k, v = qkv(key, length)
    best_bs, best_vs, rows = None, None, []
    for cfg in BS_CONFIGS:
        if time.perf_counter() - START > budget_s:
            break
        try:
            total = 0.0
            for density in (None, 0.1):
                idx, counts = random_block_lists(key, length, cfg[0], cfg[1], density)
                r = block_sparse_case(q, k, v, idx, counts, cfg)
                total += r["kernel_ms"]
                rows.append(("block_sparse", cfg, density or "dense", r))
                log(f"sweep block_sparse {cfg} {density or 'dense'}: {r['kernel_ms']:.2f} ms {r['tflops']:.0f} TFLOP/s")
            if best_bs is None or total < best_bs[1]:
                best_bs = (cfg, total)
        except Exception as e:  # a config Triton cannot compile (e.g. out of shared memory) is skipped
            log(f"sweep block_sparse {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
    verticals, slashes = vs_pattern(key, length, "nearest")
    for cfg in VS_CONFIGS:
        if time.perf_counter() - START > budget_s:
            break
        try:
            r = vertical_slash_case(q, k, v, verticals, slashes, cfg)
            rows.append(("vertical_slash", cfg, "nearest", r))
            log(f"sweep vertical_slash {cfg}: {r['kernel_ms']:.2f} ms {r['tflops']:.0f} TFLOP/s")
            if best_vs is None or r["kernel_ms"] < best_vs[1]:
                best_vs = (cfg, r["kernel_ms"])
        except Exception as e:
            log(f"sweep vertical_slash {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
    return (best_bs or (BS_CONFIGS[0],))[0], (best_vs or (VS_CONFIGS[0],))[0], rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--sweep-length", type=int, default=32768)
    parser.add_argument(
        "--sweep",
        choices=("before", "after", "none"),
        default="before",
        help="before: pick the configs by the sweep; after: use the defaults (or --bs-config, "
        "--vs-config) for the table and sweep afterwards",
    )
    parser.add_argument("--bs-config", default=None, help="block_q,block_k,num_warps,num_stages,heads_fastest")
    parser.add_argument("--vs-config", default=None, help="block,num_warps,num_stages,heads_fastest")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this")
    args = parser.parse_args()
    log(
        f"{datetime.datetime.now().isoformat(timespec='seconds')} jax {jax.__version__} "
        f"device {jax.devices()[0].device_kind}"
    )
    key = jax.random.key(int(time.time()))  # fresh inputs every run
    results = dict(correctness=check_correctness(key))
    bs_cfg, vs_cfg = BS_CONFIGS[0], VS_CONFIGS[0]
    if args.bs_config:
        bs_cfg = tuple(int(x) for x in args.bs_config.split(","))
    if args.vs_config:
        vs_cfg = tuple(int(x) for x in args.vs_config.split(","))
    if args.sweep == "before":
        bs_cfg, vs_cfg, rows = sweep(jax.random.fold_in(key, 1), args.sweep_length, args.budget_s * 0.5)
        results["sweep"] = [(a, list(c), str(d), r) for a, c, d, r in rows]
    log(f"using block_sparse {bs_cfg} (block_q, block_k, warps, stages), vertical_slash {vs_cfg}")
    table = []
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = qkv(jax.random.fold_in(key, length), length)
        cases = block_sparse_cases(q, k, v, key, bs_cfg)
        for kind in ("nearest", "random"):
            cases.append(
                (
                    f"vertical_slash {kind}",
                    lambda kd=kind, q=q, k=k, v=v: vertical_slash_case(
                        q, k, v, *vs_pattern(jax.random.fold_in(key, 9), length, kd), vs_cfg
                    ),
                )
            )
        table += run_cases(cases, length, args.budget_s)
        del q, k, v
    if args.sweep == "after":
        best_bs, best_vs, rows = sweep(jax.random.fold_in(key, 1), args.sweep_length, args.budget_s)
        results["sweep"] = [(a, list(c), str(d), r) for a, c, d, r in rows]
        log(f"sweep after the table: best block_sparse {best_bs}, vertical_slash {best_vs}")
    results["table"] = [(n, name, r) for n, name, r in table]
    results["configs"] = dict(block_sparse=list(bs_cfg), vertical_slash=list(vs_cfg))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_sparse.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(
        f"\nblock_sparse mosaic {MOSAIC_CONFIG} (block_q, block_k, stages), triton {bs_cfg} (block_q, block_k, "
        f"warps, stages, heads_fastest); vertical_slash {vs_cfg} "
        f"(block, warps, stages, heads_fastest); {jax.devices()[0].device_kind}; B=1 H=32 KVH=8 D=128 bf16 "
        "causal; prep = canonicalising pre-pass / index build\n"
    )
    print(kernel_table(table))


def kernel_table(table: list[tuple[int, str, dict]]) -> str:
    """Markdown rows (length, variant, result) with the rate and speedup against the same length's cuDNN row."""
    cudnn = {n: r for n, name, r in table if name == "cudnn dense"}
    lines = [
        "| L | variant | tiles computed | kernel ms | prep ms | TFLOP/s (computed) | rate / cuDNN's "
        "| speedup vs cuDNN (kernel / +prep) | GB/s moved (of copy bandwidth) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, name, r in table:
        base = cudnn.get(n)
        sp = (
            f"{base['kernel_ms'] / r['kernel_ms']:.2f}x / {base['kernel_ms'] / (r['kernel_ms'] + r['prep_ms']):.2f}x"
            if base
            else "-"
        )
        rate = f"{r['tflops'] / base['tflops']:.0%}" if base else "-"
        moved = f"{r['gbps']:.0f} ({r['gbps'] / COPY_GBS:.0%})" if "gbps" in r else "-"
        lines.append(
            f"| {n // 1024}K | {name} | {r['tile_frac']:.1%} | {r['kernel_ms']:.2f} | {r['prep_ms']:.2f} | "
            f"{r['tflops']:.0f} | {rate} | {sp} | {moved} |"
        )
    return "\n".join(lines)


def block_sparse_cases(q, k, v, key, triton_cfg) -> list:
    """(name, thunk) for the dense-attention peers and the block-sparse rows at q's length: cuDNN, tokamax (when
    installed), both block-sparse kernels on dense lists and at each of DENSITIES."""
    length = q.shape[1]
    cases = [("cudnn dense", lambda: cudnn_case(q, k, v)), ("tokamax dense", lambda: tokamax_case(q, k, v))]
    for density in (None,) + DENSITIES:
        for impl, cfg in (("mosaic", MOSAIC_CONFIG), ("triton", triton_cfg)):
            cases.append(
                (
                    f"block_sparse {impl} {'dense' if density is None else f'{density:.0%}'}",
                    lambda d=density, c=cfg: block_sparse_case(
                        q, k, v, *random_block_lists(jax.random.fold_in(key, 7), length, c[0], c[1], d), c
                    ),
                )
            )
    return cases


def run_cases(cases, length: int, budget_s: float) -> list[tuple[int, str, dict]]:
    """Runs each (name, thunk) until `budget_s` seconds since the start; a case that fails or returns None
    (a peer not installed) is logged and left out."""
    rows = []
    for name, case in cases:
        if time.perf_counter() - START > budget_s:
            log(f"budget spent: skipping {name} at {length}")
            continue
        try:
            r = case()
        except Exception as e:  # noqa: BLE001 (one failing variant must not lose the others' rows)
            log(f"{name} at {length} failed: {type(e).__name__}: {str(e)[:400]}")
            continue
        if r is None:
            continue
        rows.append((length, name, r))
        log(
            f"L={length} {name}: kernel {r['kernel_ms']:.3f} ms, prep {r['prep_ms']:.3f} ms, "
            f"{r['tflops']:.0f} TFLOP/s, tiles {r['tile_frac']:.1%}"
        )
    return rows


def block_sparse_rows(
    key, length: int, budget_s: float = float("inf"), triton_cfg=BS_CONFIGS[0]
) -> list[tuple[int, str, dict]]:
    """`block_sparse_cases` run at one length on fresh inputs (for `benchmarks.sparse_prefill --kernels`)."""
    q, k, v = qkv(jax.random.fold_in(key, length), length)
    return run_cases(block_sparse_cases(q, k, v, key, triton_cfg), length, budget_s)


if __name__ == "__main__":
    main()
