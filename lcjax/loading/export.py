"""Writes a model as a transformers checkpoint (config.json + sharded safetensors + index).

The inverse of loading, so a model fine-tuned in lcjax (e.g. after LongRoPE extension) opens in
transformers, and so tests can make checkpoints of any shape without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from lcjax.config import ModelConfig


def hf_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers name, float32 array in transformers layout) for every parameter."""
    c = config
    H, K, Hd, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    f32 = lambda a: np.asarray(a, np.float32)
    yield "model.embed_tokens.weight", f32(params["embed"])
    from lcjax.models.params import stack_layers
    lp = stack_layers(params)["layers"]
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        q, k, v = (f32(lp[n][i]).reshape(-1, D) for n in ("wq", "wk", "wv"))
        fused = "w_gate_up" in lp  # `Transformer.with_fused_mlp`
        gate, up = (f32(lp["w_gate_up"][i, t]) if fused else f32(lp[n][i]) for t, n in enumerate(("w_gate", "w_up")))
        yield pre + "input_layernorm.weight", f32(lp["attn_norm"][i])
        yield pre + "post_attention_layernorm.weight", f32(lp["mlp_norm"][i])
        if c.family == "phi3":
            yield pre + "self_attn.qkv_proj.weight", np.concatenate([q, k, v])
            yield pre + "mlp.gate_up_proj.weight", np.concatenate([gate, up])
        else:
            yield pre + "self_attn.q_proj.weight", q
            yield pre + "self_attn.k_proj.weight", k
            yield pre + "self_attn.v_proj.weight", v
            yield pre + "mlp.gate_proj.weight", gate
            yield pre + "mlp.up_proj.weight", up
        if c.qkv_bias:
            yield pre + "self_attn.q_proj.bias", f32(lp["bq"][i]).reshape(H * Hd)
            yield pre + "self_attn.k_proj.bias", f32(lp["bk"][i]).reshape(K * Hd)
            yield pre + "self_attn.v_proj.bias", f32(lp["bv"][i]).reshape(K * Hd)
        yield pre + "self_attn.o_proj.weight", f32(lp["wo"][i]).reshape(D, H * Hd)
        yield pre + "mlp.down_proj.weight", f32(lp["w_down"][i])
    yield "model.norm.weight", f32(params["final_norm"])
    if not c.tie_word_embeddings:
        yield "lm_head.weight", f32(params["lm_head"])


def save_checkpoint(params: dict, config: ModelConfig, directory: str | os.PathLike,
                    max_shard_bytes: int = 2 * 2**30) -> list[Path]:
    """Writes config.json, `model-0000i-of-0000n.safetensors` shards and the index; returns the shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in hf_tensors(params, config):
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    n = len(shards)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, 1):
        path = directory / f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path))
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(a.nbytes for s in shards for a in s.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths
