"""The one map between transformers checkpoint tensors and lcjax's parameters: loading, shape checks, error
messages and export all derive from `checkpoint_layout`.

A checkpoint tensor (transformers' name and `[out, in]` layout) fills one or more parameters, each from a run of
its rows: Phi-3's fused `qkv_proj` fills `wq`, `wk` and `wv`; every other tensor fills one parameter whole. The
rows reshape to the parameter's per-layer shape (`param_specs`), so loading never transposes, and export
concatenates the parameters' rows back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from lcjax.config import FAMILIES, ModelConfig
from lcjax.models.params import ParamSpec, param_specs


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows `[start, stop)` of a checkpoint tensor fill parameter `path` at `layer` (None: not per layer)."""

    path: tuple[str, ...]
    layer: int | None
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """One tensor a complete checkpoint holds: its name, transformers-layout shape and the parameters it fills."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]


def _layer_tensors(config: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(name suffix, parameters stacked along its rows) of one decoder layer, in checkpoint order."""
    family = FAMILIES[config.family]
    attn = "self_attn."
    qkv = (
        [("qkv_proj", ("wq", "wk", "wv"))]
        if family.fused_qkv
        else [("q_proj", ("wq",)), ("k_proj", ("wk",)), ("v_proj", ("wv",))]
    )
    tensors = [("input_layernorm.weight", ("attn_norm",)), ("post_attention_layernorm.weight", ("mlp_norm",))]
    tensors += [(f"{attn}{proj}.weight", params) for proj, params in qkv]
    if config.qkv_bias:
        tensors += [(f"{attn}{proj}.bias", tuple("b" + p[1] for p in params)) for proj, params in qkv]
    tensors.append((f"{attn}o_proj.weight", ("wo",)))
    gate_up = (
        [("mlp.gate_up_proj.weight", ("w_gate", "w_up"))]
        if family.fused_gate_up
        else [("mlp.gate_proj.weight", ("w_gate",)), ("mlp.up_proj.weight", ("w_up",))]
    )
    return tensors + gate_up + [("mlp.down_proj.weight", ("w_down",))]


def _rows(spec_shape: tuple[int, ...], checkpoint_width: tuple[int, ...]) -> int:
    """Rows a parameter of per-layer `spec_shape` takes in a checkpoint tensor whose other dims are `width`."""
    return int(np.prod(spec_shape)) // int(np.prod(checkpoint_width, dtype=np.int64))


@functools.cache
def checkpoint_layout(config: ModelConfig) -> dict[str, CheckpointTensor]:
    """Every tensor a complete transformers checkpoint of `config` holds, by name, in checkpoint order."""
    specs = param_specs(config)
    layout: dict[str, CheckpointTensor] = {}

    def add(name: str, paths: tuple[tuple[str, ...], ...], layer: int | None):
        shapes = [_param_shape(specs, path, layer) for path in paths]
        width = _checkpoint_width(paths[0], shapes[0])
        parts, start = [], 0
        for path, shape in zip(paths, shapes):
            stop = start + _rows(shape, width)
            parts.append(Part(path, layer, start, stop))
            start = stop
        layout[name] = CheckpointTensor(name, (start, *width), tuple(parts))

    add("model.embed_tokens.weight", (("embed",),), None)
    for i in range(config.num_layers):
        for suffix, params in _layer_tensors(config):
            add(f"model.layers.{i}.{suffix}", tuple(("layers", p) for p in params), i)
    add("model.norm.weight", (("final_norm",),), None)
    if not config.tie_word_embeddings:
        add("lm_head.weight", (("lm_head",),), None)
    return layout


def _param_shape(specs: dict, path: tuple[str, ...], layer: int | None) -> tuple[int, ...]:
    """A parameter's shape from its spec; per layer (without the stacked axis) for a layer's part."""
    spec: ParamSpec = get_path(specs, path)
    return spec.shape[1:] if layer is not None else spec.shape


def get_path(tree: dict, path: tuple[str, ...]):
    """`tree[path[0]][path[1]]...` (a parameter or its spec)."""
    for key in path:
        tree = tree[key]
    return tree


def _checkpoint_width(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The trailing dims of the checkpoint tensor holding a parameter of per-layer `shape`: transformers keeps
    `[out, in]` matrices and `[out]` vectors, where lcjax splits out heads (`wq: [heads, head_dim, hidden]`,
    `wo: [hidden, heads, head_dim]`, `bq: [heads, head_dim]`)."""
    name = path[-1]
    if name == "wo":
        return (shape[1] * shape[2],)
    if name in ("wq", "wk", "wv"):
        return (shape[-1],)
    if name in ("bq", "bk", "bv"):
        return ()
    return shape[1:]


def ignored(config: ModelConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that lcjax deliberately skips: rotary caches, a tied `lm_head.weight`."""
    return name.endswith(".self_attn.rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def to_param(array: np.ndarray, part: Part, param_shape: tuple[int, ...]) -> np.ndarray:
    """The part of checkpoint `array` that fills one parameter, in the parameter's (per-layer) shape."""
    return array[part.start : part.stop].reshape(param_shape)


def checkpoint_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array in transformers layout) for every tensor of `checkpoint_layout`, from stacked,
    unfused params (`stack_layers`, `unfuse_mlp`)."""
    for tensor in checkpoint_layout(config).values():
        pieces = []
        for part in tensor.parts:
            value = get_path(params, part.path)
            value = np.asarray(value if part.layer is None else value[part.layer], np.float32)
            pieces.append(value.reshape((part.stop - part.start, *tensor.shape[1:])))
        yield tensor.name, np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
