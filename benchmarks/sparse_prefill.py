"""GPU benchmark: vertical-slash sparse prefill end to end (estimate + index build + kernel) vs cuDNN dense,
and lcjax's kernel vs MInference's own Triton kernel on the same indices.

Causal, batch 1, 32 q heads / 8 KV heads, head_dim 128, bf16; MInference's default budgets (1000 verticals,
6096 slashes, estimated from the last 64 queries). Index sets, named in the table:
  * "structured": a synthetic head built so attention concentrates on a local band plus ~50 vertical key
    columns per KV head (q/k share a slowly varying sinusoidal "RoPE-like" vector -> locality; 50 random
    "sink" keys carry a strong component every query of the group also carries). The indices are
    lcjax's online estimate (`estimate_vertical_slash`) of that head, so they are what MInference would pick.
  * "nearest": MInference's ideal set, verticals 0..999 and slashes 0..6095 (no estimation).
Sections: (0) `--kernels`: dense attention and block-sparse kernels against cuDNN and tokamax at
--kernel-lengths (`benchmarks.sparse_kernels`' rows); (1) lcjax per length: cuDNN dense, estimate, index
build, kernel (blocks 128 and 64), end to end (one jit: estimate + build + kernel); (2) MInference's Triton kernel
(PyTorch) on the same q/k/v and indices, validated against lcjax at 4K, when a peer module is present (see
`load_peer`); (3) `--model`: Llama-3-8B-shaped random-weight prefill, dense vs
`MInference.vertical_slash(32, 32, backend="pallas")`. `--benchmarks-md BENCHMARKS.md` appends the run (date,
device, jax, command, checks, tables) to that file.
Times are medians of >= 10 samples after warm-up (the slowest rows fewer, as printed). TFLOP/s count the
tiles each kernel computes (4 * b * b * head_dim per tile or column chunk). A markdown table comes last.

    export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
    PYTHONPATH=. python3 -m benchmarks.sparse_prefill [--lengths 131072,262144,524288] [--kernels] [--model] [--json]
        [--benchmarks-md BENCHMARKS.md]      # all sections: --kernels --model
    python -m benchmarks.sparse_prefill --cpu-smoke      # tiny lengths, interpret mode, no torch
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import sparse_kernels
from benchmarks.timing import median_seconds
from lcjax.config import llama3_8b_config
from lcjax.methods.minference import MInference, estimate_vertical_slash
from lcjax.models.transformer import Transformer, _prefill
from lcjax.pallas.vertical_slash_attention import vertical_slash_attention, vertical_slash_attention_reference
from lcjax.pallas.vertical_slash_attention_mgpu import build_mgpu_index, vertical_slash_attention_mgpu
from lcjax.pallas.vertical_slash_index import build_vertical_slash_index
from lcjax.pallas.vertical_slash_ranges import (
    build_vertical_slash_ranges,
    range_schedule_tiles,
    vertical_slash_attention_ranges,
    vertical_slash_cover_reference,
)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM**-0.5
N_VERTICAL, N_SLASH, LAST_Q = 1000, 6096, 64
N_SINKS = 50
PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".carry", "minference_peer.py")
START = time.perf_counter()
INTERPRET = False
ROWS: list[dict] = []
NOTES: list[str] = []


def log(*a):
    print(f"[{time.perf_counter() - START:6.1f}s]", *a, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def timeit(fn, *args, samples: int = 10) -> tuple[float, int]:
    """Median seconds per call after compile + one warm-up; (median, samples)."""
    return median_seconds(fn, *args, samples=samples), samples


# ---- inputs ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("length",))
def structured_qkv(key, length: int):
    """Structured synthetic head: local band + N_SINKS vertical columns per KV head (see module doc)."""
    kq, kk, kv, ks = jax.random.split(key, 4)
    pos = jnp.arange(length, dtype=jnp.float32)
    freqs = jnp.geomspace(1 / 8192, 1 / 16, 32)
    ang = pos[:, None] * freqs[None, :]
    amp = 2.3  # peak local logit ~ amp^2 * 32 / sqrt(128) = 15
    loc = amp * jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)  # [L, 64]
    q = 0.5 * jax.random.normal(kq, (1, length, HEADS, HEAD_DIM), jnp.float32)
    k = 0.5 * jax.random.normal(kk, (1, length, KV_HEADS, HEAD_DIM), jnp.float32)
    v = jax.random.normal(kv, (1, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    q = q.at[..., :64].add(loc[None, :, None, :])
    k = k.at[..., :64].add(loc[None, :, None, :])
    # one unit direction u_h in dims 64..127 per KV head; sink keys carry 12.6 u_h, every query of the group 12.6 u_h
    ku, kp = jax.random.split(ks)
    u = jax.random.normal(ku, (KV_HEADS, 64))
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    sinks = jax.vmap(lambda kk_: jax.random.choice(kk_, length, (N_SINKS,), replace=False))(
        jax.random.split(kp, KV_HEADS)
    )  # [KV_HEADS, N_SINKS]
    strength = 12.6
    sink_add = (
        jnp.zeros((length, KV_HEADS, 64))
        .at[sinks, jnp.arange(KV_HEADS)[:, None]]
        .set(strength * jnp.broadcast_to(u[:, None, :], (KV_HEADS, N_SINKS, 64)))
    )
    k = k.at[0, :, :, 64:].add(sink_add)
    q = q.at[0, :, :, 64:].add(strength * jnp.repeat(u, HEADS // KV_HEADS, axis=0)[None])
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v


def nearest_indices(length: int):
    nv, ns = min(N_VERTICAL, length), min(N_SLASH, length)
    return (
        jnp.broadcast_to(jnp.arange(nv, dtype=jnp.int32), (1, HEADS, nv)),
        jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), (1, HEADS, ns)),
    )


# ---- lcjax pieces ---------------------------------------------------------------------------------------


@jax.jit
def estimate(q, k):
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return estimate_vertical_slash(q, k, lengths, N_VERTICAL, N_SLASH, LAST_Q, SCALE)


def make_fns(length: int, block: int, schedule: str = "diagonal", slash_mask: str = "gather"):
    """(build, kernel, estimate+build+kernel, build+kernel) for the "diagonal" (square tiles by tile
    diagonal) or "ranges" (merged slash groups as unaligned key ranges) vertical-slash schedule, with masked
    tiles reading slashes from bit words ("bits") or gathering them per element ("gather"), or, ranges only,
    "cover": MInference's semantics (every key of the covered ranges; no slash test). Schedule "mosaic": the
    ranges walked by the Hopper (Mosaic GPU) kernel, cover semantics, 64-row blocks."""
    if schedule == "mosaic":
        if slash_mask != "cover" or block != 64:
            raise ValueError("the mosaic schedule runs cover semantics on 64-row blocks: mosaic:64:cover")
        build_fn = lambda vi, so: build_mgpu_index(vi, so, length)
        attend = lambda q, k, v, ix: vertical_slash_attention_mgpu(q, k, v, *ix, scale=SCALE)
    elif schedule == "ranges":
        semantics = "cover" if slash_mask == "cover" else "exact"
        build_fn = lambda vi, so: build_vertical_slash_ranges(vi, so, length, block, semantics=semantics)
        kw = {} if slash_mask == "cover" else dict(slash_mask=slash_mask)
        attend = lambda q, k, v, ix: vertical_slash_attention_ranges(
            q, k, v, ix, scale=SCALE, interpret=INTERPRET, **kw
        )
    else:
        build_fn = lambda vi, so: build_vertical_slash_index(vi, so, length, block, block)
        attend = lambda q, k, v, ix: vertical_slash_attention(
            q, k, v, ix, scale=SCALE, interpret=INTERPRET, slash_mask=slash_mask
        )
    b, kern = jax.jit(build_fn), jax.jit(attend)

    @jax.jit
    def e2e(q, k, v):
        vi, so = estimate(q, k)
        return attend(q, k, v, build_fn(vi, so))

    @jax.jit
    def build_kernel(q, k, v, vi, so):
        return attend(q, k, v, build_fn(vi, so))

    return b, kern, e2e, build_kernel


def tile_count(index, block: int, length: int) -> tuple[int, float]:
    """Tile-equivalents the kernel computes (tiles or range chunks, plus column chunks) and their share of
    the causal tiles."""
    nqb = -(-length // block)
    if isinstance(index, tuple):  # the Hopper kernel: range chunks, column chunks, diagonal passes
        ranges, columns = index
        total = int(
            range_schedule_tiles(ranges)["chunks"].sum()
            + jnp.sum(columns.column_chunks)
            + jnp.sum(jnp.any(columns.diagonal_words != 0, axis=-1))
        )
    elif hasattr(index, "group_counts"):  # range schedule
        stats = range_schedule_tiles(index)
        total = int(stats["chunks"].sum() + stats["columns"].sum())
    else:
        tiles = int(jnp.sum(index.plain_counts) + jnp.sum(index.masked_counts))
        total = tiles + int(jnp.sum((index.column_counts + block - 1) // block))
    return total, total / (HEADS * nqb * (nqb + 1) / 2)


def dense(q, k, v):
    impl = None if INTERPRET else "cudnn"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=SCALE, implementation=impl)


dense_jit = jax.jit(dense)


def add_row(**r):
    ROWS.append(r)
    log("ROW", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


def lcjax_section(
    length: int, key, samples: int, slow_samples: int, variants=(("diagonal", 128, "bits"), ("diagonal", 64, "bits"))
):
    """Returns (q, k, v, structured indices) for the torch section."""
    q, k, v = jax.block_until_ready(structured_qkv(key, length))
    dense_flops = 4 * HEADS * length * length / 2 * HEAD_DIM
    slow = length >= 262144
    t, n = timeit(dense_jit, q, k, v, samples=slow_samples if slow else samples)
    t_dense = t
    add_row(
        L=length,
        impl="cuDNN dense",
        index_set="-",
        block=0,
        tile_frac=1.0,
        est_ms=0.0,
        build_ms=0.0,
        kernel_ms=t * 1e3,
        e2e_ms=t * 1e3,
        tflops=dense_flops / t / 1e12,
        speedup_e2e=1.0,
        samples=n,
    )
    t_est, n_est = timeit(estimate, q, k, samples=samples)
    vi, so = estimate(q, k)
    sets = {"structured (est.)": (vi, so), "nearest": nearest_indices(length)}
    for name, (vv, ss) in sets.items():
        for schedule, block, slash_mask in variants:
            b, kern, e2e, bk = make_fns(length, block, schedule, slash_mask)
            t_build, _ = timeit(b, vv, ss, samples=samples)
            index = b(vv, ss)
            tiles, frac = tile_count(index, block, length)
            t_kern, n_k = timeit(kern, q, k, v, index, samples=samples)
            if name == "nearest":
                t_e2e, _ = timeit(bk, q, k, v, vv, ss, samples=samples)
                est_ms = 0.0
            else:
                t_e2e, _ = timeit(e2e, q, k, v, samples=samples)
                est_ms = t_est * 1e3
            impl = f"lcjax {'mosaic' if schedule == 'mosaic' else 'pallas'} b{block} {schedule} {slash_mask}"
            add_row(
                L=length,
                impl=impl,
                index_set=name,
                block=block,
                tile_frac=frac,
                est_ms=est_ms,
                build_ms=t_build * 1e3,
                kernel_ms=t_kern * 1e3,
                e2e_ms=t_e2e * 1e3,
                tflops=4 * block * block * HEAD_DIM * tiles / t_kern / 1e12,
                speedup_e2e=t_dense / t_e2e,
                samples=n_k,
            )
            del index
    return q, k, v, (vi, so), t_dense, t_est


# ---- MInference's kernel (a peer the repository does not carry) ------------------------------------------


def load_peer():
    """The side-by-side run of MInference's own kernel lives in `.carry/minference_peer.py`, which is not part
    of lcjax: it runs MInference's source, which lcjax neither ships nor builds. It gets this module as
    `bench` and provides load_minference(), validate(mod, key) and torch_section(mod, ...)."""
    if not os.path.exists(PEER):
        return None
    spec = importlib.util.spec_from_file_location("minference_peer", PEER)
    peer = importlib.util.module_from_spec(spec)
    peer.bench = sys.modules[__name__]
    spec.loader.exec_module(peer)
    return peer


def check_schedules(key, variants, length: int = 4096, nv: int = 128, ns: int = 512):
    """Each schedule's kernel vs the exact-mask fp32 reference on the structured head's estimated indices
    (budgets small enough that the pattern is sparse at this length); fresh inputs, every element finite."""
    q, k, v = structured_qkv(key, length)
    vi, so = estimate_vertical_slash(q, k, jnp.full((1,), length, jnp.int32), nv, ns, LAST_Q, SCALE)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    refs = {}
    ok = []
    for schedule, block, slash_mask in variants:
        ref_key = ("cover", block) if slash_mask == "cover" else "exact"
        if ref_key not in refs:
            with jax.default_matmul_precision("highest"):
                refs[ref_key] = np.asarray(
                    vertical_slash_cover_reference(*up, vi, so, q_len=length, block=block, scale=SCALE)
                    if slash_mask == "cover"
                    else vertical_slash_attention_reference(*up, vi, so, scale=SCALE)
                )
        ref = refs[ref_key]
        b, kern, _, _ = make_fns(length, block, schedule, slash_mask)
        name = f"{schedule} b{block} {slash_mask}"
        try:
            out = np.asarray(kern(q, k, v, b(vi, so)).astype(jnp.float32))
        except Exception as e:  # noqa: BLE001 (a variant that fails to compile is reported, not fatal)
            msg = str(e).split("\n")
            NOTES.append(
                f"check L={length} {name}: FAILED {type(e).__name__}: " + " | ".join(line[:200] for line in msg[:6])
            )
            log(NOTES[-1])
            continue
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        NOTES.append(
            f"check L={length} {name} ({nv} v / {ns} s, estimated): rel L2 vs its fp32 "
            f"reference ({ref_key if isinstance(ref_key, str) else 'cover'}) {err:.2e}, "
            f"finite={np.isfinite(out).all()}"
        )
        log(NOTES[-1])
        if err < 1e-2 and np.isfinite(out).all():  # a wrong kernel is reported and not timed
            ok.append((schedule, block, slash_mask))
    return ok


def check_reference(key, length: int):
    """CPU smoke: lcjax kernel (interpret) vs the XLA reference on the structured head."""
    q, k, v = structured_qkv(key, length)
    vi, so = estimate(q, k)
    ix = build_vertical_slash_index(vi, so, length, 64, 64)
    ours = np.asarray(vertical_slash_attention(q, k, v, ix, scale=SCALE, interpret=True).astype(jnp.float32))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = np.asarray(vertical_slash_attention_reference(*up, vi, so, scale=SCALE))
    NOTES.append(
        f"smoke L={length}: lcjax interpret vs reference rel L2 {np.linalg.norm(ours - ref) / np.linalg.norm(ref):.2e}"
    )
    log(NOTES[-1])


# ---- model ----------------------------------------------------------------------------------------------


def model_section(
    seq: int,
    runs: int,
    keep_cache: bool = True,
    mlp_chunk: int | None = None,
    semantics: tuple[str, ...] = ("exact", "cover"),
):
    """Llama-3-8B-shaped prefill, dense vs vertical-slash. For 512K: keep_cache=False (the cache alone would
    be 68 GiB) and mlp_chunk (e.g. 32768) so the MLP intermediates stay small."""
    cfg = llama3_8b_config()
    model = Transformer.init(cfg, jax.random.key(7), dtype=jnp.bfloat16)
    rng = np.random.default_rng(int(time.time()))
    lengths = jnp.full((1,), seq, jnp.int32)
    res = {}
    variants = [("dense (cuDNN)", model)] + [
        (
            f"vertical_slash(pallas, {sem})",
            model.with_transforms(
                attention=MInference.vertical_slash(
                    cfg.num_layers, cfg.num_heads, backend="pallas", slash_semantics=sem
                )
            ),
        )
        for sem in semantics
    ]
    for name, m in variants:
        toks = [jnp.asarray(rng.integers(0, cfg.vocab_size, (1, seq)), jnp.int32) for _ in range(runs + 1)]
        t0 = time.perf_counter()
        compiled = _prefill.lower(m, toks[0], lengths, seq if keep_cache else 0, "last", mlp_chunk).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(m, toks[0], lengths))
        times = []
        for t in toks[1:]:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(m, t, lengths))
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times) * 1e3
        line = (
            f"model Llama-3-8B-shaped random weights, {seq} tokens, {name}: {res[name]:.0f} ms "
            f"(median of {runs}, compile {compile_s:.0f} s, cache kept: {keep_cache}, mlp_chunk {mlp_chunk})"
        )
        NOTES.append(line)
        log(line)
        del compiled
        gc.collect()
    names = list(res)
    for name in names[1:]:
        NOTES.append(
            f"model speedup {name} vs dense: {res[names[0]] / res[name]:.2f}x (random weights: the "
            "online estimate picks near-dense indices)"
        )
        log(NOTES[-1])


# ---- main -----------------------------------------------------------------------------------------------


def table() -> str:
    head = (
        "| L | implementation | index set | tiles computed | est ms | build ms | kernel ms | e2e ms | "
        "TFLOP/s (computed tiles) | e2e speedup vs cuDNN | theirs / fastest lcjax kernel | samples |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in ROWS:
        ratio = r.get("theirs_over_fastest_lcjax_kernel")
        tokens = f"{r['L'] // 1024}K" if r["L"] >= 1024 else str(r["L"])
        lines.append(
            f"| {tokens} | {r['impl']} | {r['index_set']} | {r['tile_frac']:.1%} | "
            f"{r['est_ms']:.2f} | {r['build_ms']:.2f} | {r['kernel_ms']:.2f} | {r['e2e_ms']:.2f} | "
            f"{r['tflops']:.0f} | {r['speedup_e2e']:.2f}x | {'' if ratio is None else f'{ratio:.2f}x'} | "
            f"{r['samples']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    global INTERPRET
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="131072,262144,524288")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--slow-samples", type=int, default=5, help="samples for cuDNN >= 256K and theirs at 512K")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--model", action="store_true", help="section 3: 8B-shaped prefill at --model-len")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--model-len", type=int, default=131072)
    p.add_argument("--model-runs", type=int, default=3)
    p.add_argument("--model-no-cache", action="store_true", help="prefill without keeping a KV cache (512K)")
    p.add_argument("--model-mlp-chunk", type=int, default=None, help="MLP in sequence chunks (512K: 32768)")
    p.add_argument(
        "--model-semantics",
        default="exact,cover",
        help="vertical-slash semantics run beside dense in the model section (exact, cover)",
    )
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip what starts after this many seconds")
    p.add_argument("--json", action="store_true", help="write $OUT/bench_prefill.json")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="section 0: dense and block-sparse kernels vs cuDNN and tokamax at --kernel-lengths",
    )
    p.add_argument("--kernel-lengths", default="8192,32768,131072")
    p.add_argument("--benchmarks-md", default=None, help="append this run's tables to that markdown file")
    p.add_argument("--schedules", default="diagonal", help="vertical-slash schedules: diagonal,ranges,mosaic")
    p.add_argument("--blocks", default="128,64")
    p.add_argument(
        "--variants",
        default="",
        help="schedule:block:mask list, e.g. diagonal:128:gather,ranges:64:cover "
        "(overrides --schedules/--blocks/--slash-masks)",
    )
    p.add_argument(
        "--slash-masks",
        default="gather",
        help="masked tiles' slash test: bits,gather; cover = MInference's semantics (ranges only)",
    )
    a = p.parse_args(argv)
    seed = int(time.time())
    key = jax.random.key(seed)
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, seed {seed}")
    if a.cpu_smoke:
        INTERPRET = True
        lengths, a.no_torch, a.samples, a.slow_samples = [256], True, 2, 2
        check_reference(key, 256)
    else:
        lengths = [int(x) for x in a.lengths.split(",") if x]
    mod, validated = None, False
    variants = [
        (s_, int(b_), m_)
        for s_ in a.schedules.split(",")
        for b_ in a.blocks.split(",")
        for m_ in a.slash_masks.split(",")
        if not (s_ == "diagonal" and m_ == "cover")
    ]
    if a.variants:
        variants = [(s_, int(b_), m_) for s_, b_, m_ in (v_.split(":") for v_ in a.variants.split(","))]
    if not a.model_only and not a.cpu_smoke:
        variants = check_schedules(key, variants)
    peer = None if a.no_torch else load_peer()
    if peer is None and not a.no_torch:
        NOTES.append(f"no MInference peer at {PEER}: lcjax and cuDNN only")
        a.no_torch = True
    kernel_rows = []
    if a.kernels and not a.model_only:
        if a.cpu_smoke:
            NOTES.append("kernels section skipped: cuDNN and the Mosaic kernels need the GPU")
        else:
            for length in (int(x) for x in a.kernel_lengths.split(",") if x):
                kernel_rows += sparse_kernels.block_sparse_rows(jax.random.fold_in(key, length), length, a.deadline_s)
    if not a.model_only:
        for length in lengths:
            if elapsed() > a.deadline_s:
                NOTES.append(f"L={length}: skipped, past --deadline-s")
                log(NOTES[-1])
                continue
            key, sub = jax.random.split(key)
            try:
                q, k, v, (vi, so), t_dense, t_est = lcjax_section(
                    length, sub, a.samples, a.slow_samples, variants=tuple(variants)
                )
            except Exception as e:  # noqa: BLE001 (OOM at the longest lengths: skip with a message)
                NOTES.append(f"L={length}: lcjax section skipped: {type(e).__name__}: {str(e)[:300]}")
                log(NOTES[-1])
                gc.collect()
                continue
            if mod is None and not a.no_torch:
                import torch

                log(f"torch {torch.__version__}, loading the MInference peer")
                try:
                    mod = peer.load_minference()
                except Exception as e:  # noqa: BLE001
                    a.no_torch = True
                    NOTES.append(f"MInference extension failed to load: {type(e).__name__}: {str(e)[:300]}")
                    log(NOTES[-1])
            if mod is not None and not validated:
                validated = True
                log("MInference loaded")
                try:
                    peer.validate(mod, key)
                except Exception as e:  # noqa: BLE001
                    NOTES.append(f"validation failed: {type(e).__name__}: {str(e)[:300]}")
                    log(NOTES[-1])
            if mod is not None:
                try:
                    peer.torch_section(mod, length, q, k, v, vi, so, t_dense, t_est, a.samples, a.slow_samples)
                except Exception as e:  # noqa: BLE001
                    NOTES.append(f"L={length}: MInference section skipped: {type(e).__name__}: {str(e)[:300]}")
                    log(NOTES[-1])
                    import torch

                    torch.cuda.empty_cache()
            del q, k, v, vi, so
            gc.collect()
            if a.json:
                dump(a, kernel_rows)
    if (a.model or a.model_only) and not a.cpu_smoke:
        if elapsed() > a.deadline_s:
            NOTES.append("model section skipped, past --deadline-s")
        else:
            try:
                model_section(
                    a.model_len,
                    a.model_runs,
                    not a.model_no_cache,
                    a.model_mlp_chunk,
                    tuple(a.model_semantics.split(",")),
                )
            except Exception as e:  # noqa: BLE001
                NOTES.append(f"model section failed: {type(e).__name__}: {str(e)[:300]}")
                log(NOTES[-1])
    if a.json:
        dump(a, kernel_rows)
    report = run_report(a, argv, kernel_rows)
    print()
    print(report)
    if a.benchmarks_md:
        with open(a.benchmarks_md, "a") as f:
            f.write("\n" + report + "\n")
        log(f"appended to {a.benchmarks_md}")


def run_report(a, argv, kernel_rows) -> str:
    """The run as a markdown section: date, device, jax, command, notes (checks, model lines), tables."""
    command = "python -m benchmarks.sparse_prefill " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"## bench_prefill run, {datetime.date.today()}",
        "",
        f"- Device: {jax.devices()[0].device_kind}; jax {jax.__version__}.",
        f"- Command: `{command}`",
    ]
    lines += [f"- {n}" for n in NOTES]
    if kernel_rows:
        lines += [
            "",
            "Dense and block-sparse kernels (B=1, 32 q / 8 KV heads, head_dim 128, bf16, causal):",
            "",
            sparse_kernels.kernel_table(kernel_rows),
        ]
    if ROWS:
        lines += ["", "Vertical-slash, end to end and against MInference's kernel:", "", table()]
    return "\n".join(lines)


def dump(a, kernel_rows=()):
    """$OUT/bench_prefill.json: the args, device, the vertical-slash rows, the kernel rows (length, variant,
    result) and the notes."""
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_prefill.json"), "w") as f:
        json.dump(
            dict(
                args=vars(a),
                device=jax.devices()[0].device_kind,
                jax=jax.__version__,
                rows=ROWS,
                kernel_rows=[dict(L=n, variant=name, **r) for n, name, r in kernel_rows],
                notes=NOTES,
            ),
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
