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
from lcjax.models.checkpoint import checkpoint_tensors
from lcjax.models.params import stack_layers, unfuse_mlp


def hf_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers name, float32 array in transformers layout) for every parameter (stacked or not,
    fused MLP or not)."""
    return checkpoint_tensors(unfuse_mlp(stack_layers(params)), config)


def save_checkpoint(
    params: dict, config: ModelConfig, directory: str | os.PathLike, max_shard_bytes: int = 2 * 2**30
) -> list[Path]:
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
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return paths
