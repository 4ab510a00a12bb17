"""Training-step benchmark on one GPU: lcjax's `train_step` against a PyTorch peer (transformers' Llama).

    python -m benchmarks.train_step jax   [--shapes llama-3.2-1b@16384 ...] [--remat ...] [--attention ...]
    python -m benchmarks.train_step torch [--shapes llama-3.2-1b@16384 ...] [--variants eager+ckpt compile+ckpt]

Both sides: random weights of the named shape, fp32 parameters and AdamW state, bf16 compute (lcjax casts the
parameters; torch autocasts), batch 1, fresh random tokens every step, the median of `--steps` timed steps after
two warm-up steps (the first compiles). Reported: tokens/s, MFU and peak device memory. MFU counts model FLOPs as
MaxText does: 6 x (matmul parameters incl. the output head) per token, plus causal attention at half the square,
3 x (4 x seq^2 x heads x head_dim / 2) per layer, over the H100's dense bf16 peak (989 TFLOP/s); recomputation is
not counted. lcjax's memory is XLA's memory analysis of the compiled step (arguments + outputs + scratch - aliased);
torch's is `torch.cuda.max_memory_allocated`. The two sides run in separate processes (each framework would hold
the other's memory). Each prints one JSON line per configuration and a markdown table last.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import jax
import numpy as np

from benchmarks.timing import kernel_times
from lcjax.config import ModelConfig, RopeConfig

H100_BF16_FLOPS = 989e12

SHAPES = {
    # SmolLM2-135M (the built-in model's shape)
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=100000.0), tie_word_embeddings=True,
    ),
    # Llama-3.2-1B (its llama3 RoPE scaling changes no FLOP and is left out)
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0), tie_word_embeddings=True,
    ),
}  # fmt: skip


def step_flops(cfg: ModelConfig, seq: int, batch: int = 1) -> float:
    """Model FLOPs of one training step (forward + backward), MaxText's count."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d + 3 * d * cfg.intermediate_size
    matmul = 2 * batch * seq * (per_layer * cfg.num_layers + d * cfg.vocab_size)
    attention = 4 * batch * seq * seq * cfg.num_heads * hd / 2 * cfg.num_layers
    return 3 * (matmul + attention)


def compiled_bytes(mem) -> int:
    """Device bytes a compiled step holds at its peak, by XLA's memory analysis (per device when sharded)."""
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def parse_shape(text: str) -> tuple[str, ModelConfig, int]:
    name, _, seq = text.partition("@")
    if name not in SHAPES or not seq.isdigit():
        raise SystemExit(f"--shapes takes NAME@SEQ with NAME one of {', '.join(SHAPES)}; got {text!r}.")
    return name, SHAPES[name], int(seq)


def row(side: str, shape: str, seq: int, variant: str, cfg: ModelConfig, seconds: float | None, memory: float | None,
        error: str | None = None) -> dict:  # fmt: skip
    out = dict(side=side, shape=shape, seq=seq, variant=variant, error=error)
    if seconds is not None:
        out.update(step_s=seconds, tokens_per_s=seq / seconds, mfu=step_flops(cfg, seq) / seconds / H100_BF16_FLOPS)
    if memory is not None:
        out["memory_gib"] = memory / 2**30
    print(json.dumps(out), flush=True)
    return out


def bench_jax(
    shape: str,
    cfg: ModelConfig,
    seq: int,
    remat: str | None,
    attention: str,
    steps: int,
    profile: str | None = None,
    fuse: bool = False,
    layout: str = "stacked",
) -> dict:
    import jax
    import jax.numpy as jnp

    from lcjax.models.attention import DenseAttention
    from lcjax.models.transformer import Transformer
    from lcjax.train import TrainConfig, init_state, train_step

    transforms = {
        "cudnn": DenseAttention("cudnn"),
        "cudnn-causal": CausalCudnnAttention(),
        "xla": DenseAttention("xla"),
        "tokamax": TokamaxAttention(),
    }
    transform = transforms[attention]
    variant = (
        f"{attention}, remat {remat}"
        + (", fused projections" if fuse else "")
        + (", layers unstacked" if layout == "unstacked" else "")
    )
    config = TrainConfig(
        learning_rate=1e-5,
        warmup_steps=1,
        total_steps=100,
        remat=remat,
        compute_dtype="bfloat16",
        fuse_projections=fuse,
    )
    model = Transformer.init(cfg, jax.random.key(0), dtype=jnp.float32, attention=transform)
    # unstacked: a Python loop over layers instead of a scan (no stacked residuals to copy in and out)
    state = init_state(model.with_layer_layout(layout).params, config)
    model = Transformer({}, cfg, transform)
    rng = np.random.default_rng(0)
    lengths = jnp.full((1, 1), seq, jnp.int32)

    def tokens():
        return jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 1, seq)), jnp.int32)

    try:
        compiled = train_step.lower(state, model, tokens(), lengths, config).compile()
        mem = compiled.memory_analysis()
        memory = compiled_bytes(mem)
        times = []
        for i in range(steps + 2):
            batch = tokens()
            jax.block_until_ready(batch)
            t0 = time.perf_counter()
            state, metrics = compiled(state, model, batch, lengths)
            float(metrics["loss"])
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if profile:
            with jax.profiler.trace(profile):
                state, metrics = compiled(state, model, tokens(), lengths)
                float(metrics["loss"])
            totals, span = kernel_times(profile)
            groups = collections.Counter()
            for name, (_, ns) in totals.items():
                groups[kernel_group(name)] += ns
            kinds = ", ".join(f"{k} {ns / 1e6:.1f} ms" for k, ns in groups.most_common())
            print(f"GPU kernels of one step: {span / 1e6:.1f} ms from first to last; by kind: {kinds}; the 40 longest:")
            for name, (calls, ns) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:40]:
                print(f"  {ns / 1e6:8.2f} ms {calls:5d} x  {name[:110]}")
        return row("lcjax", shape, seq, variant, cfg, statistics.median(times), memory)
    except Exception as e:  # out of memory, or a kernel that does not apply: recorded, the next variant runs
        return row("lcjax", shape, seq, variant, cfg, None, None, f"{type(e).__name__}: {str(e)[:300]}")


def kernel_group(name: str) -> str:
    """A GPU kernel's kind, by its name: fused attention, matrix product, or the rest (XLA's fusions, copies)."""
    lower = name.lower()
    if any(s in lower for s in ("sdpa", "fmha", "flash", "attention", "mgpu")):
        return "attention"
    if any(s in lower for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas")):
        return "matmul"
    return "other"


class CausalCudnnAttention:
    """cuDNN's fused attention with the causal mask alone (no key lengths): for right-padded rows every valid
    query already sees only valid keys, so the lengths change only the outputs at padded positions."""

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(other) is type(self)

    def __call__(self, q, k, v, cache, meta):
        out = jax.nn.dot_product_attention(q, k, v, scale=meta.scale, is_causal=True, implementation="cudnn")
        return out, cache


class TokamaxAttention:
    """Causal training attention through tokamax (Mosaic GPU on Hopper), the peer of cuDNN's fused kernel."""

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(other) is type(self)

    def __call__(self, q, k, v, cache, meta):
        import tokamax

        out = tokamax.dot_product_attention(q, k, v, is_causal=True, scale=meta.scale, implementation="mosaic")
        return out, cache


def bench_torch(shape: str, cfg: ModelConfig, seq: int, variant: str, steps: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**cfg.to_hf_config(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf).cuda()
    if "ckpt" in variant:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    run = torch.compile(step) if "compile" in variant else step
    torch.cuda.reset_peak_memory_stats()
    try:
        times = []
        for i in range(steps + 2):
            ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(ids).item()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return row("torch", shape, seq, variant, cfg, statistics.median(times), torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError as e:
        return row("torch", shape, seq, variant, cfg, None, None, f"OutOfMemoryError: {str(e)[:120]}")


def torch_empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def plan(shape: str, cfg: ModelConfig, seq: int, mesh_spec: str, remat: str | None) -> dict:
    """Compiles (without running) one training step of `shape` at `seq` tokens on a mesh of this host's devices
    ("fsdp=2,context=4"; fake CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=8) and reports
    XLA's per-device memory: what shows a step is expressible before any multi-GPU machine runs it."""
    import jax

    from lcjax.models.params import abstract_params
    from lcjax.models.transformer import Transformer
    from lcjax.sharding import logical_sharding, make_mesh
    from lcjax.train import TrainConfig, init_state, train_step

    sizes = {k: int(v) for k, v in (part.split("=") for part in mesh_spec.split(","))}
    mesh = make_mesh(**sizes, devices=jax.devices()[: int(np.prod(list(sizes.values())))])
    config = TrainConfig(remat=remat, compute_dtype="bfloat16")
    params = abstract_params(cfg, np.float32, mesh=mesh)
    # the state's shardings as the initialiser produces them (moments follow their parameters)
    init = jax.jit(lambda p: init_state(p, config))
    shardings = init.lower(params).compile().output_shardings
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init, params),
                         shardings)  # fmt: skip
    tokens = jax.ShapeDtypeStruct(
        (1, 1, seq), np.int32, sharding=logical_sharding((1, 1, seq), (None, "batch", "seq"), mesh)
    )
    lengths = jax.ShapeDtypeStruct((1, 1), np.int32, sharding=logical_sharding((1, 1), (None, "batch"), mesh))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, Transformer({}, cfg), tokens, lengths, config, mesh).compile()
    mem = compiled.memory_analysis()
    per_device = compiled_bytes(mem)
    out = dict(side="plan", shape=shape, seq=seq, mesh=mesh_spec, remat=remat, compile_s=time.perf_counter() - t0,
               memory_gib_per_device=per_device / 2**30, temp_gib=mem.temp_size_in_bytes / 2**30,
               arguments_gib=mem.argument_size_in_bytes / 2**30)  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| side | shape | seq | variant | tokens/s | MFU | step (s) | memory (GiB) |", "|---" * 8 + "|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['side']} | {r['shape']} | {r['seq']} | {r['variant']} | {r['error'][:60]} | | | |")
            continue
        lines.append(
            f"| {r['side']} | {r['shape']} | {r['seq']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['step_s']:.3f} | {r['memory_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=("jax", "torch", "plan"))
    p.add_argument("--mesh", default="fsdp=8", help="plan: the mesh to compile for")
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m@32768", "llama-3.2-1b@16384", "llama-3.2-1b@32768"])
    p.add_argument("--remat", nargs="+", default=["dots_with_no_batch_dims_saveable", "nothing_saveable"])
    p.add_argument("--attention", nargs="+", default=["cudnn"], choices=("cudnn", "cudnn-causal", "xla", "tokamax"))
    p.add_argument("--variants", nargs="+", default=["eager+ckpt", "compile+ckpt"], help="torch configurations")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fuse", nargs="+", default=["off"], choices=("off", "on"), help="jax: fused projections")
    p.add_argument("--layout", nargs="+", default=["stacked"], choices=("stacked", "unstacked"), help="jax: layers")
    p.add_argument("--profile", default=None, help="jax: trace one more step here and print its longest kernels")
    p.add_argument("--out", default=None, help="append the JSON rows to this file")
    a = p.parse_args(argv)
    rows = []
    for text in a.shapes:
        shape, cfg, seq = parse_shape(text)
        if a.side == "plan":
            for remat in a.remat:
                rows.append(plan(shape, cfg, seq, a.mesh, None if remat == "none" else remat))
            continue
        if a.side == "jax":
            for attention in a.attention:
                for remat in a.remat:
                    for fuse in a.fuse:
                        remat_ = None if remat == "none" else remat
                        for layout in a.layout:
                            rows.append(
                                bench_jax(shape, cfg, seq, remat_, attention, a.steps, a.profile, fuse == "on", layout)
                            )
        else:
            for variant in a.variants:
                rows.append(bench_torch(shape, cfg, seq, variant, a.steps))
                torch_empty_cache()
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if a.side != "plan":
        print(table(rows))


if __name__ == "__main__":
    main()
