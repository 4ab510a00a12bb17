"""GPU probe: does the layout of K and V hold the block-sparse kernel back on short random lists?

The question (BENCHMARKS.md, "Block-sparse short lists"): at 128K, 1% random lists run at 80-84% of cuDNN's
rate although the memory floor allows 298%. Their 3.15 ms is what reading Q, O and ~70% of the listed tiles
(13.25 GB in all if every tile came from HBM) would take at the 3.2 TB/s read bandwidth, so L2 would serve only
~30% of the tiles, where a 50 MB L2 over one KV head's 64 MiB of K/V could serve more. Another reading: in
lcjax's `[batch, seq, kv_heads, head_dim]` layout one KV head's K (or V) tile of 128 keys is 128 pieces of 256
bytes, 2 KiB apart; if HBM serves such scattered pieces below its streaming rate, tiles stored in one piece
would be faster.

Prediction, written before any run: if the layout is the limit, 128K 1% lists run >= 10% faster with the KV
heads folded into the batch (a tile is then one 32 KiB piece); 8K rows (whose K/V stay in L2) change by less
than their run-to-run spread. If 128K 1% moves by less than 5%, the layout is not what bounds it.

Method: the same Mosaic GPU kernel on the same lists, called (a) as lcjax calls it and (b) with the KV heads
folded into the batch: k, v `[kv_heads, seq, 1, d]`, q `[kv_heads, seq, group, d]` (1 KiB pieces instead of
256 B), lists `[kv_heads, group, blocks, ...]`. Both number the items the same way wherever runs hold one KV head
(16K and longer). (b) unfolded must equal (a) bit for bit: each item computes the same tiles in the same order.
Also: the copies that fold q, k, v (what the layout costs when the inputs come in lcjax's layout), cuDNN dense
(the rate's denominator), and XLA reads of one KV head's slice, strided vs contiguous, streamed and as random
tiles. Medians of 10 after warm-up, fresh random inputs, two repetitions with the order swapped.

Second question (after the first run, 2026-12-07, found the layout is not the limit): is it L2's reach? One KV
head's K and V are 64 MiB at 128K, more than the 50 MB L2, and random lists touch them all. `--spans` runs 128K 1%
lists of the same lengths whose off-diagonal tiles are drawn only among the first `span` key blocks (the diagonal
kept), so each KV head's tiles in use are span x 64 KiB. Prediction, written before that run: if L2 is the limit,
span 256 (16 MiB a KV head) runs >= 10% faster than span 1024 (all, 64 MiB); if it moves by less than 5%, it is
not.

    PYTHONPATH=. python3 -m experiments.probe_kv_layout [--lengths 8192,131072] [--densities 0.01,0.05,0.1]
    PYTHONPATH=. python3 -m experiments.probe_kv_layout --spans 1024,512,256 [--span-length 131072]
    python -m experiments.probe_kv_layout --interpret     # CPU: the fold checked on the Triton kernel
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_sparse_kernels import (HEAD_DIM, HEADS, KV_HEADS, MOSAIC_CONFIG, SCALE, cudnn_case, log,
                                              qkv, random_block_lists, timeit)
from lcjax.pallas.block_sparse_attention import block_sparse_attention_canonical, canonicalize_block_indices
from lcjax.pallas.block_sparse_hopper import block_sparse_attention_hopper


def fold_qkv(q, k, v):
    """The KV heads folded into the batch: q `[b, seq, heads, d]` -> `[b * kv_heads, seq, group, d]`; k, v
    `[b, seq, kv_heads, d]` -> `[b * kv_heads, seq, 1, d]` (query head h = kv_head * group + j, as the kernels'
    GQA mapping h // group has it)."""
    b, seq, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q_f = q.reshape(b, seq, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, seq, group, d)
    k_f, v_f = (x.transpose(0, 2, 1, 3).reshape(b * kv_heads, x.shape[1], 1, d) for x in (k, v))
    return q_f, k_f, v_f


def fold_heads(q, k, v, indices, schedule):
    """`fold_qkv`, and the lists `[b, heads, ...]` -> `[b * kv_heads, group, ...]` to match."""
    kv_heads, group = k.shape[2], q.shape[2] // k.shape[2]
    lists = tuple(x.reshape(x.shape[0] * kv_heads, group, *x.shape[2:]) for x in (indices, schedule))
    return fold_qkv(q, k, v) + lists


def unfold_output(out_f, batch: int):
    """`fold_heads`' inverse for the output: `[b * kv_heads, seq, group, d]` -> `[b, seq, heads, d]`."""
    bk, seq, group, d = out_f.shape
    kv_heads = bk // batch
    return out_f.reshape(batch, kv_heads, seq, group, d).transpose(0, 2, 1, 3, 4).reshape(
        batch, seq, kv_heads * group, d)


def canonical_case(key, length: int, density: float | None, block_q: int, block_k: int, span: int | None = None):
    """Fresh q, k, v and `random_block_lists` (drawn within `span` if given) in canonical form, and the tiles
    they compute."""
    q, k, v = qkv(jax.random.fold_in(key, length), length)
    idx, counts = random_block_lists(jax.random.fold_in(key, 7 if span is None else span), length, block_q,
                                     block_k, density, span)
    ci, sc = canonicalize_block_indices(idx, counts, q_len=length, kv_len=length, block_q=block_q,
                                        block_k=block_k, causal=True)
    return (q, k, v, ci, sc), int(jnp.sum(sc[..., 1]))


def rate(tiles: int, ms: float, cudnn_tflops: float, block_q: int, block_k: int) -> float:
    """TFLOP/s over the computed tiles as a fraction of cuDNN's dense rate."""
    return 4 * block_q * block_k * HEAD_DIM * tiles / (ms * 1e-3) / 1e12 / cudnn_tflops


def span_case(key, length: int, density: float, span: int, block_q: int, block_k: int) -> dict:
    """The kernel as lcjax calls it on `random_block_lists` drawn within `span`: tiles computed and kernel ms
    (median of 10)."""
    args, tiles = canonical_case(key, length, density, block_q, block_k, span)
    return dict(length=length, density=density, span=span, tiles=tiles,
                ms=timeit(kernel_fn(False, block_q, block_k), *args) * 1e3)


def kernel_fn(interpret: bool, block_q: int, block_k: int, stages: int = MOSAIC_CONFIG[2]):
    """The kernel on canonical lists: the Mosaic GPU one (with `stages` K/V slots), or (CPU check) the Triton one
    in interpret mode."""
    if interpret:
        return jax.jit(lambda q, k, v, i, s: block_sparse_attention_canonical(
            q, k, v, i, s, scale=SCALE, block_q=block_q, block_k=block_k, interpret=True))
    return jax.jit(lambda q, k, v, i, s: block_sparse_attention_hopper(
        q, k, v, i, s, scale=SCALE, block_q=block_q, block_k=block_k, stages=stages))


def layout_case(key, length: int, density: float, interpret: bool, block_q: int, block_k: int) -> dict:
    """(a) and (b) on one set of inputs and lists: their outputs compared, then timed twice, order swapped."""
    (q, k, v, ci, sc), tiles = canonical_case(key, length, density, block_q, block_k)
    kern = kernel_fn(interpret, block_q, block_k)
    fold = jax.jit(fold_heads)
    folded = jax.block_until_ready(fold(q, k, v, ci, sc))
    out = np.asarray(kern(q, k, v, ci, sc).astype(jnp.float32))
    out_b = np.asarray(unfold_output(kern(*folded), q.shape[0]).astype(jnp.float32))
    r = dict(length=length, density=density, tiles=tiles,
             bitwise_equal=bool(np.array_equal(out, out_b)),
             rel_diff=float(np.linalg.norm(out_b - out) / np.linalg.norm(out)), finite=bool(np.isfinite(out_b).all()))
    if interpret:
        return r
    times = {"as is": [], "folded": []}
    for order in (("as is", "folded"), ("folded", "as is")):
        for name in order:
            times[name].append(timeit(kern, *((q, k, v, ci, sc) if name == "as is" else folded)) * 1e3)
    r.update(ms_as_is=times["as is"], ms_folded=times["folded"],
             fold_qkv_ms=timeit(jax.jit(fold_qkv), q, k, v) * 1e3)
    return r


def read_bandwidth(rows: int = 1 << 20, tile: int = 128, tiles_read: int = 4096) -> list[dict]:
    """GB/s of XLA reads of one KV head's K in lcjax's layout (`[rows, kv_heads, d]`: 256-byte pieces 2 KiB
    apart) and head-major (`[kv_heads, rows, d]`: one piece), streamed (a sum over the head's rows) and as
    random 128-row tiles (a gather, then a sum)."""
    x = jax.random.normal(jax.random.key(int(time.time())), (rows, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    x_hm = jax.block_until_ready(jnp.transpose(x, (1, 0, 2)))
    starts = jax.random.randint(jax.random.key(1), (tiles_read,), 0, rows // tile) * tile
    head = 3

    def tiles_of(a, heads_major: bool):  # one head's rows [s, s + tile) for every start s, summed
        take = ((lambda s: jax.lax.dynamic_slice(a, (head, s, 0), (1, tile, HEAD_DIM))) if heads_major else
                (lambda s: jax.lax.dynamic_slice(a, (s, head, 0), (tile, 1, HEAD_DIM))))
        return jnp.sum(jax.vmap(take)(starts).astype(jnp.float32), axis=(0, 1, 2))

    cases = {
        "stream, [rows, kv_heads, d]": (jax.jit(lambda a: jnp.sum(a[:, head].astype(jnp.float32), axis=0)), x,
                                        rows),
        "stream, [kv_heads, rows, d]": (jax.jit(lambda a: jnp.sum(a[head].astype(jnp.float32), axis=0)), x_hm,
                                        rows),
        "random tiles, [rows, kv_heads, d]": (jax.jit(lambda a: tiles_of(a, False)), x, tiles_read * tile),
        "random tiles, [kv_heads, rows, d]": (jax.jit(lambda a: tiles_of(a, True)), x_hm, tiles_read * tile),
    }
    out = []
    for name, (fn, array, rows_read) in cases.items():
        t = timeit(fn, array)
        out.append(dict(read=name, ms=t * 1e3, gbs=rows_read * HEAD_DIM * 2 / t / 1e9))
        log(f"{name}: {t * 1e3:.3f} ms, {out[-1]['gbs']:.0f} GB/s")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,131072")
    p.add_argument("--densities", default="0.01,0.05,0.1")
    p.add_argument("--spans", default="",
                   help="run the L2-reach question instead: comma list of key-block spans (1024 = all at 128K)")
    p.add_argument("--span-length", type=int, default=131072)
    p.add_argument("--span-density", type=float, default=0.01)
    p.add_argument("--interpret", action="store_true",
                   help="CPU check of the fold: the Triton kernel in interpret mode at 256 and 200 tokens, lists "
                        "of 30%% and 60%% of the causal blocks and all of them (sparser lists hold only the "
                        "diagonal there, the same for every head, and could not show a wrong fold)")
    a = p.parse_args(argv)
    key = jax.random.key(int(time.time()))
    densities = [float(x) for x in a.densities.split(",")]
    if a.interpret:
        for length in (256, 200):
            for density in (0.3, 0.6, None):
                r = layout_case(key, length, density, True, 32, 32)
                log(r)
                if not (r["bitwise_equal"] and r["finite"]):
                    raise SystemExit("the folded call differs from the plain one")
        return
    log(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    bq, bk = MOSAIC_CONFIG[:2]
    if a.spans:
        return span_main(key, a, bq, bk)
    results = dict(reads=read_bandwidth(), kernels=[], cudnn={})
    for length in (int(x) for x in a.lengths.split(",")):
        results["cudnn"][length] = cudnn_case(*qkv(jax.random.fold_in(key, 3), length))["tflops"]
        for density in densities:
            r = layout_case(key, length, density, False, bq, bk)
            results["kernels"].append(r)
            log(r)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_kv_layout.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n| read | ms | GB/s |\n|---|---|---|")
    for r in results["reads"]:
        print(f"| {r['read']} | {r['ms']:.3f} | {r['gbs']:.0f} |")
    print("\n| L | lists | as is ms (rate / cuDNN's) | folded ms (rate) | folded / as is | fold q,k,v ms | "
          "bitwise equal |\n|---|---|---|---|---|---|---|")
    for r in results["kernels"]:
        cudnn = results["cudnn"][r["length"]]
        a_ms, b_ms = np.median(r["ms_as_is"]), np.median(r["ms_folded"])
        print(f"| {r['length'] // 1024}K | {r['density']:.0%} | {'/'.join(f'{t:.3f}' for t in r['ms_as_is'])} "
              f"({rate(r['tiles'], a_ms, cudnn, bq, bk):.0%}) | {'/'.join(f'{t:.3f}' for t in r['ms_folded'])} "
              f"({rate(r['tiles'], b_ms, cudnn, bq, bk):.0%}) | "
              f"{b_ms / a_ms:.2f} | {r['fold_qkv_ms']:.3f} | {r['bitwise_equal']} |")


def span_main(key, a, block_q: int, block_k: int) -> None:
    """Every span twice, the order reversed the second time; a table of ms and rates last."""
    cudnn = cudnn_case(*qkv(jax.random.fold_in(key, 3), a.span_length))["tflops"]
    spans = [int(x) for x in a.spans.split(",")]
    rows = {s: [] for s in spans}
    for order in (spans, spans[::-1]):
        for span in order:
            r = span_case(key, a.span_length, a.span_density, span, block_q, block_k)
            rows[span].append(r)
            log(r)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_l2_span.json"), "w") as f:
            json.dump(dict(cudnn_tflops=cudnn, rows=rows), f, indent=1)
    print(f"\ncuDNN dense {cudnn:.0f} TFLOP/s\n| span (key blocks) | K/V per KV head | tiles | ms (rep 1 / rep 2) | "
          f"rate / cuDNN's |\n|---|---|---|---|---|")
    for span, rs in rows.items():
        ms = float(np.median([r["ms"] for r in rs]))
        print(f"| {span} | {span * block_k * HEAD_DIM * 4 / 2**20:.0f} MiB | {rs[0]['tiles']} | "
              f"{' / '.join(f'{r['ms']:.3f}' for r in rs)} | {rate(rs[0]['tiles'], ms, cudnn, block_q, block_k):.0%} |")


if __name__ == "__main__":
    main()
