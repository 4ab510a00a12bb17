"""GPU benchmark: decode of a Llama-3-8B-shaped model (random bf16 weights), lcjax vs Hugging Face transformers.

Per (batch, context): time to first token (the prefill of `context` random tokens, logits of the last) and decode
speed (`--new` greedy tokens after it; lcjax: the jitted `lax.while_loop` of `lcjax.generate`; transformers:
`generate(..., cache_implementation="static")`, sdpa, eager (`disable_compile=True`) and with the decode
step auto-compiled by transformers (torch.compile, its default for a static cache on CUDA), decode time taken as
generate(new + 1 tokens) minus generate(1 token); and at its fastest, "loop": a `StaticCache` filled by an eager
prefill, then a `torch.compile(mode="reduce-overhead")` step per token in a Python loop, timed alone). The same
weights are copied into transformers (DLPack).
Roofline: a decode step must read the weights (15.01 GB: all but the input embedding table, of which it gathers
one row per sequence) and each sequence's KV cache once; floor = bytes / 2972 GB/s (the H100's measured copy
bandwidth, BENCHMARKS.md's device ceilings); "of roofline" = floor / measured step time.
lcjax runs first and is freed before transformers is built, so both fit at batch 8 x 32K.
`--caches dense,kivi,quest` adds lcjax rows with KIVI's 2-bit cache and Quest's page selection (SCBench's
settings): their floor counts the bytes they must read (KIVI: its whole packed cache; Quest: its page bounds and
1024 tokens' K/V per sequence), and the cache column is the cache pytree's real size after decoding. A method's
settings follow a colon, `retr_attn:index=graph,top_k=100` (RetrievalAttention as its paper runs it; its rows
add the host memory the cache holds, and its floor counts the GPU window and the retrieved keys).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 -m benchmarks.decode_model
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import COPY_GBS
from lcjax.cache import cache_nbytes
from lcjax.config import llama3_8b_config
from lcjax.generate import _bucket, _decode_loop, _token_buffer
from lcjax.methods import cache_method
from lcjax.models.attention import DenseAttention
from lcjax.models.transformer import Transformer
from lcjax.sampling import Greedy


def kv_bytes(cfg, batch: int, tokens: int) -> float:
    return 2 * cfg.num_layers * batch * tokens * cfg.num_kv_heads * cfg.head_dim * 2


def read_bytes(cache, cfg, batch: int, context: int) -> float:
    """Bytes of cache a decode step must read (see the module docstring)."""
    if type(cache).__name__ == "KIVICache":
        return cache_nbytes(cache)
    if type(cache).__name__ == "RetrievalCache":
        return cache_nbytes(cache) + kv_bytes(cfg, batch, min(context, cache.method.top_k))
    if type(cache).__name__ == "QuestCache":
        bounds = sum(x.size * 4 for x in jax.tree.leaves((cache.kmin, cache.kmax)))
        return bounds + kv_bytes(cfg, batch, min(context, cache.token_budget))
    return kv_bytes(cfg, batch, context)


def cache_of(spec: str):
    """`name` or `name:key=value,...` (SCBench's method name and settings; numbers parsed) as a cache transform."""
    name, _, settings = spec.partition(":")
    kw = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        kw[key] = int(value) if value.lstrip("-").isdigit() else value
    return cache_method(name, **kw)


def cache_specs(arg: str) -> list[str]:
    """`--caches` split into specs: a comma starts a new spec unless what follows is another `key=value` of the
    spec before (`dense,retr_attn:index=graph,top_k=100` is two)."""
    specs = []
    for item in filter(None, arg.split(",")):
        if specs and ":" in specs[-1] and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def lcjax_rows(model: Transformer, shapes, new: int, samples: int, rng, caches=("dense",)) -> list[dict]:
    rows = []
    for (batch, context), name in ((s, c) for s in shapes for c in caches):
        try:
            rows.append(
                _lcjax_row(
                    model.with_transforms(cache_transform=cache_of(name) or "dense"),
                    batch,
                    context,
                    new,
                    samples,
                    rng,
                    name,
                )
            )
        except Exception as e:  # noqa: BLE001 (out of memory at the largest shapes: report, go on)
            print(f"lcjax batch {batch} x {context}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            gc.collect()
            continue
        print("ROW", rows[-1], flush=True)
    return rows


def _lcjax_row(model: Transformer, batch: int, context: int, new: int, samples: int, rng, spec: str) -> dict:
    cfg = model.config
    ttft, step = [], []
    for i in range(samples + 1):  # the first run compiles
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, context)), jnp.int32)
        t0 = time.perf_counter()
        chunk = 4096 if batch * context > 65536 else None  # MLP in chunks: batch 8 x 32K fits
        groups = 1 if batch * context > 262144 else None  # beyond 8 x 32K: one sequence's prefill at a time
        logits, cache = model.prefill(
            prompt, capacity=_bucket(context + new), logits="last", mlp_chunk=chunk, batch_chunk=groups
        )
        first = jax.block_until_ready(jnp.argmax(logits, -1).astype(jnp.int32))
        t1 = time.perf_counter()
        state = jax.block_until_ready(
            _decode_loop(model, first, cache, jax.random.key(i), jnp.int32(new), _token_buffer(new), (), Greedy(), None)
        )
        t2 = time.perf_counter()
        assert int(state.step) == new
        if i:
            ttft.append(t1 - t0)
            step.append((t2 - t1) / new)
        cache_gib, read = cache_nbytes(state.cache) / 2**30, read_bytes(state.cache, cfg, batch, context)
        host = state.cache.host_nbytes() / 2**30 if hasattr(state.cache, "host_nbytes") else None
        del cache, state
    impl = "lcjax" if model.cache_transform is None else f"lcjax + {spec}"
    layers = model.params["layers"]
    if "w_gate_up" in (layers[0] if isinstance(layers, tuple) else layers):
        impl += " (fused MLP)"
    return dict(
        impl=impl,
        batch=batch,
        context=context,
        ttft_ms=statistics.median(ttft) * 1e3,
        step_ms=statistics.median(step) * 1e3,
        samples=samples,
        cache_gib=cache_gib,
        read_bytes=read,
        **({} if host is None else dict(host_gib=host)),
    )


def torch_rows(tm, cfg, shapes, new: int, samples: int, rng, compiled: bool) -> list[dict]:
    """compiled: transformers' own auto-compile of the decode step (torch.compile, on by default with a static
    cache on CUDA) or eager (`disable_compile=True`)."""
    import torch

    rows = []
    impl = "transformers (torch.compile)" if compiled else "transformers (eager)"
    for batch, context in shapes:

        def gen(n, ids):
            with torch.no_grad():
                out = tm.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    cache_implementation="static",
                    pad_token_id=0,
                    disable_compile=not compiled,
                )
            torch.cuda.synchronize()
            return out

        ttft, step = [], []
        for i in range(samples + 1):
            ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, context)), device="cuda")
            t0 = time.perf_counter()
            gen(1, ids)
            t1 = time.perf_counter()
            out = gen(new + 1, ids)
            t2 = time.perf_counter()
            assert out.shape[1] == context + new + 1
            if i:
                ttft.append(t1 - t0)
                step.append(((t2 - t1) - (t1 - t0)) / new)
            del out
            torch.cuda.empty_cache()
        rows.append(
            dict(
                impl=impl,
                batch=batch,
                context=context,
                ttft_ms=statistics.median(ttft) * 1e3,
                step_ms=statistics.median(step) * 1e3,
                samples=samples,
            )
        )
        print("ROW", rows[-1], flush=True)
    return rows


def torch_loop_rows(tm, cfg, shapes, new: int, samples: int, rng) -> list[dict]:
    """transformers at its fastest: transformers' static-cache recipe with a hand-written greedy loop (prefill
    eager, then one `torch.compile(mode="reduce-overhead", fullgraph=True)` decode step per token, CUDA graphs),
    no `generate` around it. Decode time: the loop of `new` steps alone."""
    import torch
    from transformers import StaticCache

    def step(tok, pos, cache):
        logits = tm(tok, cache_position=pos, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    rows = []
    for batch, context in shapes:
        cache = StaticCache(config=tm.config, max_cache_len=context + new + 1)
        ttft, step_s = [], []
        for i in range(samples + 2):  # the first two runs compile and record the graph
            ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, context)), device="cuda")
            cache.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                tok = step(ids, torch.arange(context, device="cuda"), cache)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                for j in range(new):
                    torch.compiler.cudagraph_mark_step_begin()
                    tok = compiled(tok, torch.tensor([context + j], device="cuda"), cache).clone()
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i > 1:
                ttft.append(t1 - t0)
                step_s.append((t2 - t1) / new)
        rows.append(
            dict(
                impl="transformers (compiled step, own loop)",
                batch=batch,
                context=context,
                ttft_ms=statistics.median(ttft) * 1e3,
                step_ms=statistics.median(step_s) * 1e3,
                samples=samples,
            )
        )
        print("ROW", rows[-1], flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="1x4096,8x4096,1x32768,8x32768,1x131072", help="batch x context list")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--layer-layout", default="unstacked", choices=("stacked", "unstacked"))
    p.add_argument(
        "--decode-attention",
        default="auto",
        choices=("auto", "pallas", "xla"),
        help="DenseAttention(decode=...): the split-K kernel, XLA, or auto (by cache size)",
    )
    p.add_argument(
        "--mlp",
        default="separate",
        choices=("separate", "fused", "both"),
        help="lcjax rows with the MLP's gate and up matrices separate, fused (`with_fused_mlp`), or both",
    )
    p.add_argument(
        "--caches",
        default="dense",
        help="lcjax cache methods (SCBench names, settings after a colon): dense, kivi, quest, "
        "retr_attn:index=graph,top_k=100, ...",
    )
    p.add_argument(
        "--torch-modes",
        default="compiled,eager,loop",
        help="transformers rows: compiled (generate's own compile), eager, loop (compiled step, own loop)",
    )
    p.add_argument(
        "--no-lcjax",
        action="store_true",
        help="transformers rows only (run with "
        "XLA_PYTHON_CLIENT_ALLOCATOR=platform so the JAX copy of the weights is freed for torch)",
    )
    a = p.parse_args(argv)
    if unknown := set(a.torch_modes.split(",")) - {"compiled", "eager", "loop"}:
        p.error(f"--torch-modes {a.torch_modes!r}: unknown {sorted(unknown)}; choose from compiled, eager, loop")
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rng = np.random.default_rng(int(time.time()))
    cfg = llama3_8b_config()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; Llama-3-8B shape, random bf16 weights; "
        f"{a.new} new tokens, {a.samples} samples after one compile run"
    )
    model = Transformer.init(
        cfg, jax.random.key(0), dtype=jnp.bfloat16, attention=DenseAttention(decode=a.decode_attention)
    ).with_layer_layout(a.layer_layout)
    variants = {"separate": [False], "fused": [True], "both": [False, True]}[a.mlp]
    if a.mlp == "fused" and a.no_torch:  # one copy of the weights: both did not fit beside an 8 x 32K cache
        model = model.with_fused_mlp()  # (fusing it again below returns the same arrays)
    rows = (
        []
        if a.no_lcjax
        else [
            row
            for fused in variants
            for row in lcjax_rows(
                model.with_fused_mlp() if fused else model, shapes, a.new, a.samples, rng, cache_specs(a.caches)
            )
        ]
    )
    if not a.no_torch:
        import torch

        from benchmarks.prefill_model import torch_model_from

        tm = torch_model_from(model)
        del model
        gc.collect()
        print(f"torch {torch.__version__}, transformers model built", flush=True)
        for mode in a.torch_modes.split(","):
            try:
                if mode == "loop":
                    rows += torch_loop_rows(tm, cfg, shapes, a.new, a.samples, rng)
                else:
                    rows += torch_rows(tm, cfg, shapes, a.new, a.samples, rng, mode == "compiled")
            except Exception as e:  # noqa: BLE001 (report, keep the other rows)
                print(f"transformers ({mode}) failed: {type(e).__name__}: {str(e)[:300]}")
    weights = cfg.decode_params_read() * 2  # bf16; the embedding table is gathered, not read whole
    print("\n| batch | context | implementation | TTFT ms | ms / step | tokens/s | of roofline | cache GiB | samples |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        read = r.get("read_bytes", kv_bytes(cfg, r["batch"], r["context"]))
        floor_ms = (weights + read) / (COPY_GBS * 1e9) * 1e3
        gib = f"{r['cache_gib']:.2f}" if "cache_gib" in r else "-"
        print(
            f"| {r['batch']} | {r['context']} | {r['impl']} | {r['ttft_ms']:.1f} | {r['step_ms']:.2f} | "
            f"{r['batch'] / r['step_ms'] * 1e3:.0f} | {floor_ms / r['step_ms']:.0%} | {gib} | {r['samples']} |"
        )


if __name__ == "__main__":
    main()
