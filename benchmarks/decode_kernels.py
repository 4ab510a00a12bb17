"""GPU benchmark: split-K Pallas decode attention vs XLA and cuDNN on one layer's KV cache, and the decode reads
of the KIVI (2-bit) and Quest (1024-token budget) caches on the same keys and values.

Llama-3-8B attention shape (32 q heads, 8 KV heads, head_dim 128), bf16, one query token per sequence, every
sequence's cache full to `length`. Correctness first (vs the fp32 XLA references, ragged lengths, fresh
inputs), then medians of >= 20 timed calls after warm-up. GB/s = bytes the method must read / time (dense:
K and V; KIVI: packed codes, scales and zeros; Quest: page bounds plus the chosen pages' K and V); the H100's
measured copy bandwidth is ~2972 GB/s (BENCHMARKS.md's device ceilings), so GB/s / 2972 is the fraction of the
memory roofline.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 -m benchmarks.decode_kernels
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import COPY_GBS, median_seconds
from lcjax.methods.quest_pages import page_bounds, quest_decode_attention
from lcjax.pallas.decode_attention import decode_attention, decode_attention_reference
from lcjax.pallas.kivi_decode_attention import kivi_decode_attention, kivi_decode_attention_reference
from lcjax.pallas.kivi_quant import quantize_keys, quantize_values

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM**-0.5


def inputs(key, batch: int, length: int):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    return q, k, v


KIVI_BITS, KIVI_GROUP, QUEST_BUDGET, QUEST_PAGE = 2, 32, 1024, 16


def kivi_inputs(k, v):
    """The whole cache quantised (no residual: the kernel's part of the read), as kivi_decode_attention's args."""
    qk, qv = quantize_keys(k, KIVI_GROUP, KIVI_BITS), quantize_values(v, KIVI_GROUP, KIVI_BITS)
    batch, _, kvh, d = k.shape
    res = jnp.zeros((batch, KIVI_GROUP, kvh, d), k.dtype)
    return (qk.packed, qk.scale, qk.zero, qv.packed, qv.scale, qv.zero), res


def kivi_fn(impl):
    def run(q, quant, res, n):
        zero = jnp.zeros_like(n)
        return impl(
            q, *quant, n, res, res, zero, scale=SCALE, bits=KIVI_BITS, key_group=KIVI_GROUP, value_group=KIVI_GROUP
        )

    return jax.jit(run)


def quest_fn(budget):
    return jax.jit(
        lambda q, k, v, n, kmin, kmax: quest_decode_attention(
            q, k, v, n, kmin, kmax, scale=SCALE, token_budget=budget, page_size=QUEST_PAGE
        )
    )


def rel_err(out, ref):
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    return np.linalg.norm(out - ref) / np.linalg.norm(ref), bool(np.isfinite(out).all())


def cudnn(q, k, v, lengths):
    return jax.nn.dot_product_attention(
        q[:, None], k, v, scale=SCALE, key_value_seq_lengths=lengths, implementation="cudnn"
    )[:, 0]


def timed_row(name, fn, args, batch, length, gbytes, samples):
    try:
        t = median_seconds(fn, *args, samples=samples)
    except Exception as e:  # noqa: BLE001 (a peer that cannot run this shape is reported)
        print(f"{name} batch {batch} length {length}: {type(e).__name__}: {str(e)[:200]}")
        return None
    row = (batch, length, name, t * 1e6, gbytes / t, gbytes / t / COPY_GBS)
    print("ROW", row, flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--samples", type=int, default=20)
    a = p.parse_args(argv)
    key = jax.random.key(int(time.time()))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")

    # correctness: ragged lengths, fresh inputs
    q, k, v = inputs(key, 4, 5000)
    lengths = jnp.asarray([5000, 1, 2345, 4097], jnp.int32)
    ref = np.asarray(decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, scale=SCALE))
    out = np.asarray(decode_attention(q, k, v, lengths, scale=SCALE).astype(jnp.float32))
    print(
        f"check: ragged lengths {list(np.asarray(lengths))}, rel L2 vs fp32 XLA reference "
        f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}, finite {np.isfinite(out).all()}"
    )
    quant, res = kivi_inputs(k[:, :4992], v[:, :4992])
    n_q = jnp.asarray([4992, 0, 2336, 4096], jnp.int32)
    n_r = jnp.asarray([8, 1, 9, 1], jnp.int32)
    args = (q, *quant, n_q, k[:, 4992:5024], v[:, 4992:5024], n_r)
    kw = dict(scale=SCALE, bits=KIVI_BITS, key_group=KIVI_GROUP, value_group=KIVI_GROUP)
    ref = kivi_decode_attention_reference(args[0].astype(jnp.float32), *args[1:], **kw)
    print(
        "check: KIVI kernel vs fp32 XLA dequantise-then-attend, rel L2 %.2e, finite %s"
        % rel_err(kivi_decode_attention(*args, **kw), ref)
    )
    kmin, kmax = page_bounds(k, lengths, QUEST_PAGE)
    full = quest_decode_attention(q, k, v, lengths, kmin, kmax, scale=SCALE, token_budget=5008, page_size=QUEST_PAGE)
    print(
        "check: Quest with a budget over every page vs dense fp32 reference, rel L2 %.2e, finite %s"
        % rel_err(full, decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, scale=SCALE))
    )

    rows = []
    pallas = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, scale=SCALE))
    xla = jax.jit(lambda q, k, v, n: decode_attention_reference(q, k, v, n, scale=SCALE))
    for batch in (int(x) for x in a.batches.split(",")):
        for length in (int(x) for x in a.lengths.split(",")):
            key, sub = jax.random.split(key)
            q, k, v = inputs(sub, batch, length)
            n = jnp.full((batch,), length, jnp.int32)
            gbytes = 2 * k.size * k.dtype.itemsize / 1e9
            for name, fn in (("pallas split-K", pallas), ("xla", xla), ("cudnn", jax.jit(cudnn))):
                rows.append(timed_row(name, fn, (q, k, v, n), batch, length, gbytes, a.samples))
            quant, res = kivi_inputs(k, v)
            kivi_gb = sum(x.size * x.dtype.itemsize for x in quant) / 1e9
            for name, impl in (
                ("KIVI 2-bit, pallas", kivi_decode_attention),
                ("KIVI 2-bit, xla dequantise", kivi_decode_attention_reference),
            ):
                rows.append(timed_row(name, kivi_fn(impl), (q, quant, res, n), batch, length, kivi_gb, a.samples))
            kmin, kmax = page_bounds(k, n, QUEST_PAGE)
            quest_gb = (kmin.size + kmax.size) * 4 / 1e9 + gbytes * min(1.0, QUEST_BUDGET / length)
            rows.append(
                timed_row(
                    f"Quest {QUEST_BUDGET} tokens",
                    quest_fn(QUEST_BUDGET),
                    (q, k, v, n, kmin, kmax),
                    batch,
                    length,
                    quest_gb,
                    a.samples,
                )
            )
            rows = [r for r in rows if r is not None]
            del q, k, v, quant, kmin, kmax
    print("\n| batch | cache tokens | implementation | us | GB/s (bytes it must read) | of copy bandwidth |")
    print("|---|---|---|---|---|---|")
    for b, L, name, us, gbs, frac in rows:
        print(f"| {b} | {L} | {name} | {us:.1f} | {gbs:.0f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
