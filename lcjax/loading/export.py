"""Writes a model as a transformers checkpoint (config.json + sharded safetensors + index, and with a tokenizer its
files and generation_config.json).

The inverse of loading, so a model fine-tuned in lcjax (e.g. after LongRoPE extension) opens in
transformers, and so tests can make checkpoints of any shape without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
from safetensors.numpy import save_file

from lcjax.config import ModelConfig
from lcjax.models.checkpoint import checkpoint_tensors
from lcjax.models.params import stack_layers, unfuse_mlp


class HFTokenizer(Protocol):
    """What export needs of a tokenizer; `lcjax.tokenizer.Tokenizer` is one (it sits above this layer, so
    export names the role, not the class)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def save_hf_dir(self, directory: str | os.PathLike, model_max_length: int | None = None) -> list[Path]: ...


def hf_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers name, float32 array in transformers layout) for every parameter (stacked or not,
    fused MLP or not)."""
    return checkpoint_tensors(unfuse_mlp(stack_layers(params)), config)


def save_checkpoint(
    params: dict,
    config: ModelConfig,
    directory: str | os.PathLike,
    max_shard_bytes: int = 2 * 2**30,
    *,
    tokenizer: HFTokenizer | None = None,
) -> list[Path]:
    """Writes config.json, `model-0000i-of-0000n.safetensors` shards and the index; returns the shards.

    With a tokenizer (as `lcjax.load_model` returns it) also its files (`tokenizer.json`, `tokenizer_config.json`
    with `model_max_length` = the config's `max_position_embeddings`, `special_tokens_map.json`) and
    `generation_config.json`, whose eos ids (the tokenizer's, then the config's) are where transformers' `generate`
    stops, as lcjax's does: transformers' `AutoTokenizer` and `AutoModelForCausalLM` and `lcjax.load_model` all
    open the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    if tokenizer is not None:
        tokenizer.save_hf_dir(directory, model_max_length=config.max_position_embeddings)
        eos = list(dict.fromkeys((*tokenizer.eos_token_ids, *config.eos_token_ids)))
        generation = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": config.pad_token_id,
        }
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
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
