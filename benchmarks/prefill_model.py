"""Prefill benchmark of a Llama-3-8B-shaped model (random bf16 weights): lcjax vs transformers, one GPU.

    python -m benchmarks.prefill_model [--lengths 8192 32768] [--runs 10] [--no-torch]

Measures, for lcjax: compile time of the prefill function, median prefill time over `--runs` timed runs
after a warm-up (fresh random tokens each run), and the device memory one prefill needs (XLA's memory
analysis: params and tokens in, logits and the KV cache out, scratch); for transformers (torch, sdpa,
`use_cache=False`, the same weights copied over through DLPack): the same prefill time and its peak
allocated memory (weights + activations; it keeps no KV cache). Both compute logits for the last
position only (transformers' `logits_to_keep=1`), as a server's prefill does. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from lcjax.config import llama3_8b_config
from lcjax.models.attention import cudnn_attention
from lcjax.models.transformer import Transformer, _prefill
from lcjax.numerics import attention_mask, xla_attention


def _prefill_flops(cfg, seq: int) -> float:
    """Matmul FLOPs of one causal prefill (weights + attention), for the TFLOP/s column."""
    dense = 2 * seq * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size * 2) + 2 * cfg.hidden_size * cfg.vocab_size
    attn = 4 * seq * seq / 2 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return dense + attn


def bench_lcjax(model: Transformer, seq: int, runs: int, rng: np.random.Generator) -> dict:
    vocab = model.config.vocab_size
    lengths = jnp.full((1,), seq, jnp.int32)
    tokens = jnp.asarray(rng.integers(0, vocab, (1, seq)), jnp.int32)
    t0 = time.perf_counter()
    compiled = _prefill.lower(model, tokens, lengths, seq, "last").compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(model, tokens, lengths))

    inputs = [jnp.asarray(rng.integers(0, vocab, (1, seq)), jnp.int32) for _ in range(runs)]
    it = iter(inputs)
    ms = median_seconds(lambda: compiled(model, next(it), lengths), samples=runs, warmup=0) * 1e3
    mem = compiled.memory_analysis()
    # params + tokens in, logits + KV cache out, plus XLA's scratch: the device memory one prefill needs
    need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    logits, _ = compiled(model, inputs[0], lengths)
    return dict(
        compile_s=compile_s,
        ms=ms,
        peak_gib=need / 2**30,
        logits=np.asarray(logits[0], np.float32),
        tokens=np.asarray(inputs[0]),
    )


def torch_model_from(model: Transformer, dtype=None):
    """A transformers LlamaForCausalLM (sdpa, cuda, bf16 unless `dtype`) holding the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype or torch.bfloat16)
    with torch.device("cuda"):
        tm = LlamaForCausalLM(hf_cfg).eval()
    t = lambda a: torch.from_dlpack(a)
    p = model.params
    H, K, Hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    with torch.no_grad():
        tm.model.embed_tokens.weight.copy_(t(p["embed"]))
        tm.lm_head.weight.copy_(t(p["lm_head"]))
        tm.model.norm.weight.copy_(t(p["final_norm"]))
        for i, layer in enumerate(tm.model.layers):
            lp = p["layers"][i] if isinstance(p["layers"], tuple) else {k: v[i] for k, v in p["layers"].items()}
            layer.input_layernorm.weight.copy_(t(lp["attn_norm"]))
            layer.post_attention_layernorm.weight.copy_(t(lp["mlp_norm"]))
            layer.self_attn.q_proj.weight.copy_(t(lp["wq"]).reshape(H * Hd, D))
            layer.self_attn.k_proj.weight.copy_(t(lp["wk"]).reshape(K * Hd, D))
            layer.self_attn.v_proj.weight.copy_(t(lp["wv"]).reshape(K * Hd, D))
            layer.self_attn.o_proj.weight.copy_(t(lp["wo"]).reshape(D, H * Hd))
            layer.mlp.gate_proj.weight.copy_(t(lp["w_gate"]))
            layer.mlp.up_proj.weight.copy_(t(lp["w_up"]))
            layer.mlp.down_proj.weight.copy_(t(lp["w_down"]))
    return tm


def bench_torch(tm, seq: int, runs: int, rng: np.random.Generator, check_tokens: np.ndarray) -> dict:
    import torch

    vocab = tm.config.vocab_size

    def run(tokens):
        with torch.no_grad():
            out = tm(input_ids=tokens, logits_to_keep=1, use_cache=False).logits
        torch.cuda.synchronize()
        return out

    run(torch.as_tensor(rng.integers(0, vocab, (1, seq)), device="cuda"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    inputs = [torch.as_tensor(rng.integers(0, vocab, (1, seq)), device="cuda") for _ in range(runs)]
    it = iter(inputs)
    ms = median_seconds(lambda: run(next(it)), samples=runs, warmup=0) * 1e3
    logits = run(torch.as_tensor(np.array(check_tokens), device="cuda"))[0, -1].float().cpu().numpy()
    return dict(ms=ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30, logits=logits)


def check_cudnn_attention(rng: np.random.Generator) -> list[str]:
    """cuDNN prefill attention vs the fp32 XLA reference on upcast inputs: GQA, ragged lengths, window."""
    lines = []
    b, s, h, kvh, d = 2, 2048, 32, 8, 128
    for window in (None, 512):
        q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.bfloat16) for n in (h, kvh, kvh))
        lengths = jnp.asarray([s, 1500], jnp.int32)
        out = cudnn_attention(q, k, v, lengths, window, d**-0.5).astype(jnp.float32)
        slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = attention_mask(slots, s, lengths, window)
        f32 = lambda x: x.astype(jnp.float32)
        ref = xla_attention(f32(q), f32(k), f32(v), mask, d**-0.5)
        valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None]
        err = float(jnp.linalg.norm(jnp.where(valid, out - ref, 0)) / jnp.linalg.norm(jnp.where(valid, ref, 0)))
        lines.append(f"cuDNN vs fp32 reference, GQA 32/8, lengths (2048, 1500), window {window}: rel err {err:.1e}")
        assert err < 2e-2, lines[-1]
    return lines


def check_bf16_noise(rng: np.random.Generator, layers: int = 4, seq: int = 1024) -> list[str]:
    """Both bf16 implementations against transformers in fp32 on a shallow 8B-shaped model: is the
    lcjax-vs-transformers difference in bf16 just bf16 rounding (each as far from fp32 as the other)?"""
    import dataclasses

    import torch

    cfg = dataclasses.replace(llama3_8b_config(), num_layers=layers)
    tokens = rng.integers(0, cfg.vocab_size, (1, seq))
    ours32 = Transformer.init(cfg, jax.random.key(1), dtype=jnp.float32)
    ours16 = Transformer(jax.tree.map(lambda a: a.astype(jnp.bfloat16), ours32.params), cfg)

    def hf_logits(model, dtype):
        # a fresh module per dtype: `.to(bfloat16)` would also round RoPE's inv_freq buffer
        tm = torch_model_from(model, dtype)
        with torch.no_grad():
            out = tm(input_ids=torch.as_tensor(tokens, device="cuda")).logits[0].float().cpu().numpy()
        del tm
        torch.cuda.empty_cache()
        return out

    ref, hf16 = hf_logits(ours32, torch.float32), hf_logits(ours16, torch.bfloat16)
    with jax.default_matmul_precision("highest"):  # JAX's GPU default for fp32 matmuls is TF32
        ours32_logits = np.asarray(ours32(tokens))[0]
    rel = lambda x: float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    lines = [
        f"{layers}-layer 8B-shaped model, {seq} tokens, logits vs transformers fp32: "
        f"lcjax fp32 {rel(ours32_logits):.1e}, lcjax bf16 {rel(np.asarray(ours16(tokens))[0]):.1e}, "
        f"transformers bf16 {rel(hf16):.1e}"
    ]
    torch.set_default_dtype(torch.bfloat16)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    cfg = llama3_8b_config()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model = Transformer.init(cfg, jax.random.key(0), dtype=jnp.bfloat16)
    jax.block_until_ready(model.params)
    device = jax.devices()[0].device_kind
    print(f"init {cfg.num_params() / 1e9:.2f}B params in {time.perf_counter() - t0:.1f}s on {device}")

    checks = check_cudnn_attention(rng) + ([] if args.no_torch else check_bf16_noise(rng))
    rows = []
    ours = {seq: bench_lcjax(model, seq, args.runs, rng) for seq in args.lengths}
    theirs = {}
    if not args.no_torch:
        gc.collect()
        tm = torch_model_from(model)
        theirs = {seq: bench_torch(tm, seq, args.runs, rng, ours[seq]["tokens"]) for seq in args.lengths}
    for seq in args.lengths:
        o = ours[seq]
        row = dict(
            seq=seq,
            compile_s=round(o["compile_s"], 1),
            lcjax_ms=round(o["ms"], 1),
            lcjax_tflops=round(_prefill_flops(cfg, seq) / o["ms"] / 1e9, 1),
            lcjax_mem_gib=round(o["peak_gib"], 1),
        )
        if seq in theirs:
            t = theirs[seq]
            ref = t["logits"]
            row.update(
                hf_ms=round(t["ms"], 1),
                hf_peak_gib=round(t["peak_gib"], 1),
                speedup=round(t["ms"] / o["ms"], 2),
                logits_rel_diff=float(np.linalg.norm(o["logits"] - ref) / np.linalg.norm(ref)),
                same_argmax=bool(o["logits"].argmax() == ref.argmax()),
            )
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n".join(checks))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2e}" if k == "logits_rel_diff" else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
