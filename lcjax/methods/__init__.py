"""Long-context methods, one file each, named after the paper; each is a value passed to the model.

Attention transforms (the prefill): `AShape`, `TriShape`, `MInference` (vertical-slash, block-sparse, or a
searched per-head config). Cache transforms (what the KV cache is and what happens to it after each turn):
`StreamingLLMPress`, `SnapKVPress`, `PyramidKVPress` (compression), `KIVI` (2/4-bit storage), `Quest` (page
selection at decode), `RetrievalAttention` (the cache in host memory, searched at decode). Each class's defaults
are SCBench's released settings, but RetrievalAttention's, which are its paper's (`SCBENCH_SETTINGS` holds
SCBench's).

`ATTENTION_METHODS` and `CACHE_METHODS` name them as SCBench's `--attn_type` / `--kv_type` do; `attention_method`
and `cache_method` build one from its name and hyperparameters, naming the valid ones when a key is unknown.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from lcjax.cache import CacheTransform
from lcjax.config import ModelConfig
from lcjax.methods.a_shape import AShape, TriShape
from lcjax.methods.kivi import KIVI, KIVICache
from lcjax.methods.knorm import KnormPress
from lcjax.methods.minference import MInference, MInferenceConfig
from lcjax.methods.pyramidkv import PyramidKVPress
from lcjax.methods.quest import Quest, QuestCache
from lcjax.methods.retrieval_attention import RetrievalAttention, RetrievalCache
from lcjax.methods.snapkv import SnapKVPress
from lcjax.methods.streaming_llm import StreamingLLMPress
from lcjax.methods.tova import TOVAPress
from lcjax.models.attention import AttentionFn, DenseAttention

# `minference` with a pattern_config takes the patterns from the file, so only these apply beside it
_WITH_PATTERNS = ("pattern_config", "backend", "slash_semantics")


def _minference(config: ModelConfig, pattern_config: str | None = None, **kw) -> MInference:
    """SCBench's `minference`: every head vertical-slash, or the per-head patterns of `pattern_config` (a JSON
    path in MInference's format)."""
    if pattern_config is None:
        return MInference.vertical_slash(config.num_layers, config.num_heads, **kw)
    patterns = MInferenceConfig.from_json(pattern_config)
    patterns.check(config.num_layers, config.num_heads)
    return MInference(patterns, **kw)


# SCBench's --attn_type names -> builder(model config, **hyperparameters)
ATTENTION_METHODS: dict[str, Callable[..., AttentionFn]] = {
    "dense": lambda config, **kw: DenseAttention(**kw),
    "a_shape": lambda config, **kw: AShape(**kw),
    "tri_shape": lambda config, **kw: TriShape(**kw),
    "minference": _minference,
    "vertical_slash": lambda config, **kw: MInference.vertical_slash(config.num_layers, config.num_heads, **kw),
    "block_sparse": lambda config, **kw: MInference.block_sparse(config.num_layers, config.num_heads, **kw),
}


def method_fields(cls: type) -> tuple[str, ...]:
    """The hyperparameters a method class takes (its dataclass fields set at construction)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _builder_fields(builder: Callable) -> tuple[str, ...]:
    """The hyperparameters of a builder that takes the model's shape first (`MInference.vertical_slash`)."""
    return tuple(p for p in inspect.signature(builder).parameters if p not in ("num_layers", "num_heads"))


# the hyperparameters each of ATTENTION_METHODS takes
ATTENTION_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": method_fields(DenseAttention),
    "a_shape": method_fields(AShape),
    "tri_shape": method_fields(TriShape),
    "minference": ("pattern_config",) + _builder_fields(MInference.vertical_slash),
    "vertical_slash": _builder_fields(MInference.vertical_slash),
    "block_sparse": _builder_fields(MInference.block_sparse),
}

# SCBench's --kv_type names -> cache-transform class (None: the dense cache)
CACHE_METHODS: dict[str, type | None] = {
    "dense": None,
    "streamingllm": StreamingLLMPress,
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "kivi": KIVI,
    "quest": Quest,
    "retr_attn": RetrievalAttention,
    # kvpress's presses beyond SCBench's, named in SCBench's style
    "knorm": KnormPress,
    "tova": TOVAPress,
}

# where SCBench's released code runs a method otherwise than its paper's defaults (the class's): its `retr_attn`
# searches a flat (exact) index for 2000 keys
SCBENCH_SETTINGS: dict[str, dict] = {"retr_attn": dict(index="flat", top_k=2000)}


def _unknown_keys(name: str, given: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"{name} has no hyperparameter {', '.join(map(repr, unknown))}; its hyperparameters: "
            f"{', '.join(valid) or 'none'}."
        )


# the hyperparameter a token budget (SCBench's --kv_budget) sets in each cache method
BUDGET_FIELDS = {
    "streamingllm": "capacity",
    "snapkv": "capacity",
    "pyramidkv": "capacity",
    "quest": "token_budget",
    "retr_attn": "top_k",
    "knorm": "capacity",
    "tova": "capacity",
}


def cache_method(name: str, budget: int | None = None, **hyperparameters) -> CacheTransform | None:
    """The cache transform SCBench calls `name` (None for "dense"), its defaults SCBench's.

    budget: tokens the method keeps or reads (`BUDGET_FIELDS`); StreamingLLM then keeps at most a quarter of it as
    sinks (SCBench's 128 of 4096). Explicit `hyperparameters` win over both."""
    if name not in CACHE_METHODS:
        raise ValueError(f"Unknown cache method {name!r}; available: {', '.join(CACHE_METHODS)}.")
    cls = CACHE_METHODS[name]
    _unknown_keys(name, hyperparameters, () if cls is None else method_fields(cls))
    if cls is None:
        return None
    settings = dict(SCBENCH_SETTINGS.get(name, {}))
    if budget is not None and name in BUDGET_FIELDS:
        settings[BUDGET_FIELDS[name]] = budget
    if cls is StreamingLLMPress and "n_sink" not in hyperparameters:
        kept = hyperparameters.get("capacity", settings.get("capacity"))
        if kept is not None:  # sinks at most a quarter of what is kept (SCBench's 128 of 4096)
            settings["n_sink"] = min(field_default(cls, "n_sink"), kept // 4)
    return cls(**{**settings, **hyperparameters})


def field_default(cls: type, name: str):
    """The default of dataclass field `name` of `cls` (a method's own setting, declared once there)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def check_attention_fields(name: str, hyperparameters: dict) -> None:
    """Raises ValueError for an unknown attention method or hyperparameter, or an unreadable pattern config (no
    model needed)."""
    if name not in ATTENTION_METHODS:
        raise ValueError(f"Unknown attention method {name!r}; available: {', '.join(ATTENTION_METHODS)}.")
    if name == "minference" and "pattern_config" in hyperparameters:
        _unknown_keys(f"{name} with a pattern_config", hyperparameters, _WITH_PATTERNS)
        MInferenceConfig.from_json(hyperparameters["pattern_config"])
    _unknown_keys(name, hyperparameters, ATTENTION_FIELDS[name])


def attention_method(name: str, config: ModelConfig, **hyperparameters) -> AttentionFn:
    """Builds the attention transform SCBench calls `name` for a model with `config`."""
    check_attention_fields(name, hyperparameters)
    return ATTENTION_METHODS[name](config, **hyperparameters)


__all__ = [
    "ATTENTION_FIELDS",
    "ATTENTION_METHODS",
    "AShape",
    "CACHE_METHODS",
    "KIVI",
    "KIVICache",
    "MInference",
    "MInferenceConfig",
    "PyramidKVPress",
    "Quest",
    "QuestCache",
    "RetrievalAttention",
    "RetrievalCache",
    "SCBENCH_SETTINGS",
    "SnapKVPress",
    "StreamingLLMPress",
    "KnormPress",
    "TOVAPress",
    "TriShape",
    "BUDGET_FIELDS",
    "attention_method",
    "cache_method",
    "check_attention_fields",
    "field_default",
    "method_fields",
]
