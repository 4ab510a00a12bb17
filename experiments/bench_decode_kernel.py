"""GPU benchmark: split-K Pallas decode attention vs XLA and cuDNN on one layer's KV cache.

Llama-3-8B attention shape (32 q heads, 8 KV heads, head_dim 128), bf16, one query token per sequence, every
sequence's cache full to `length`. Correctness first (vs the fp32 XLA reference, ragged lengths, fresh
inputs), then medians of >= 20 timed calls after warm-up. GB/s = K and V bytes read / time; the H100's
measured copy bandwidth is ~2972 GB/s (KERNELS.md), so GB/s / 2972 is the fraction of the memory roofline.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 -m experiments.bench_decode_kernel
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import median_seconds
from lcjax.pallas.decode_attention import decode_attention, decode_attention_reference

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM ** -0.5
COPY_GBS = 2972.0


def inputs(key, batch: int, length: int):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    return q, k, v


def cudnn(q, k, v, lengths):
    return jax.nn.dot_product_attention(q[:, None], k, v, scale=SCALE, key_value_seq_lengths=lengths,
                                        implementation="cudnn")[:, 0]


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
    print(f"check: ragged lengths {list(np.asarray(lengths))}, rel L2 vs fp32 XLA reference "
          f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}, finite {np.isfinite(out).all()}")

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
                try:
                    t = median_seconds(fn, q, k, v, n, samples=a.samples)
                except Exception as e:  # noqa: BLE001 (a peer that cannot run this shape is reported)
                    print(f"{name} batch {batch} length {length}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append((batch, length, name, t * 1e6, gbytes / t, gbytes / t / COPY_GBS))
                print("ROW", rows[-1], flush=True)
            del q, k, v
    print("\n| batch | cache tokens | implementation | us | GB/s (K+V) | of copy bandwidth |")
    print("|---|---|---|---|---|---|")
    for b, L, name, us, gbs, frac in rows:
        print(f"| {b} | {L} | {name} | {us:.1f} | {gbs:.0f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
