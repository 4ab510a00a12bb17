"""Long-context methods as transforms, one file each; `ATTENTION_METHODS` and `CACHE_METHODS` build them by
SCBench's names."""

from __future__ import annotations

from typing import Callable

from lcjax.attention import DenseAttention
from lcjax.config import ModelConfig
from lcjax.methods.a_shape import AShape, TriShape
from lcjax.methods.cache_transform import Chain
from lcjax.methods.kivi import KIVI, KIVICache, kivi
from lcjax.methods.minference import MInference, MInferenceConfig, block_sparse, vertical_slash
from lcjax.methods.pyramidkv import PyramidKVPress, pyramidkv
from lcjax.methods.quest import Quest, QuestCache, quest
from lcjax.methods.snapkv import SnapKVPress, snapkv
from lcjax.methods.streaming_llm import StreamingLLMPress, streaming_llm


def _minference(config: ModelConfig, pattern_config: str | None = None, backend: str = "auto",
                slash_semantics: str = "exact", **kw):
    if pattern_config is None:
        return vertical_slash(config.num_layers, config.num_heads, backend=backend, slash_semantics=slash_semantics,
                              **kw)
    cfg = MInferenceConfig.from_json(pattern_config)
    cfg.check(config.num_layers, config.num_heads)
    return MInference(cfg, backend, slash_semantics)


# SCBench's --attn_type names -> builder(model config, **hyperparameters)
ATTENTION_METHODS: dict[str, Callable[..., object]] = {
    "dense": lambda config, **kw: DenseAttention(**kw),
    "a_shape": lambda config, **kw: AShape(**kw),
    "tri_shape": lambda config, **kw: TriShape(**kw),
    "minference": _minference,
    "vertical_slash": lambda config, **kw: vertical_slash(config.num_layers, config.num_heads, **kw),
    "block_sparse": lambda config, **kw: block_sparse(config.num_layers, config.num_heads, **kw),
}


# SCBench's --kv_type names -> cache-transform builder(**hyperparameters) (SCBench's defaults)
CACHE_METHODS: dict[str, Callable[..., object]] = {
    "dense": lambda **kw: None,
    "streamingllm": streaming_llm,
    "snapkv": snapkv,
    "pyramidkv": pyramidkv,
    "kivi": kivi,
    "quest": quest,
}


def cache_method(name: str, **hyperparameters):
    """The cache transform SCBench calls `name` (None for "dense")."""
    if name not in CACHE_METHODS:
        raise ValueError(f"Unknown cache method {name!r}; available: {', '.join(CACHE_METHODS)}.")
    return CACHE_METHODS[name](**hyperparameters)


def attention_method(name: str, config: ModelConfig, **hyperparameters):
    """Builds the attention transform SCBench calls `name` for a model with `config`."""
    if name not in ATTENTION_METHODS:
        raise ValueError(f"Unknown attention method {name!r}; available: {', '.join(ATTENTION_METHODS)}.")
    return ATTENTION_METHODS[name](config, **hyperparameters)
