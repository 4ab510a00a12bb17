"""Model configuration: one frozen dataclass for the Llama-family decoders lcjax runs.

Llama (2/3/3.1/3.2, SmolLM2), Mistral, Qwen2 and Phi-3 differ only in a handful of switches (qkv bias,
fused projections, sliding window, tied embeddings, RoPE scaling), so one config and one model serve all
four; `from_hf_config` reads transformers' `config.json` (both the `rope_scaling`/`rope_theta` keys of
transformers 4 and the `rope_parameters` key of transformers 5).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Family:
    """What sets one model family apart, as data: the checkpoint's layout and `config.json`'s keys. The forward
    pass is the same for every family.

    architecture: transformers' class name; gguf_arch: llama.cpp's `general.architecture` (None: not read from
    GGUF); fused_qkv / fused_gate_up: the checkpoint stores q, k, v as one `qkv_proj` and the MLP's gate and up
    as one `gate_up_proj`; qkv_bias: whether q/k/v have biases when `config.json` does not say
    (`attention_bias`); writes_attention_bias: whether `config.json` carries `attention_bias`; window_switch: the
    key that turns a configured sliding window on (None: a window in the config is on);
    top_level_original_max_position: whether `config.json` repeats `original_max_position_embeddings` beside
    `rope_scaling`; gguf_rope_permuted: whether llama.cpp's converter permuted the q/k rows to its
    interleaved RoPE layout.
    """

    architecture: str
    gguf_arch: str | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qkv_bias: bool = False
    writes_attention_bias: bool = False
    window_switch: str | None = None
    top_level_original_max_position: bool = False
    gguf_rope_permuted: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", gguf_arch="llama", writes_attention_bias=True, gguf_rope_permuted=True),
    "mistral": Family("MistralForCausalLM", writes_attention_bias=True),
    "qwen2": Family("Qwen2ForCausalLM", gguf_arch="qwen2", qkv_bias=True, window_switch="use_sliding_window"),
    "phi3": Family(
        "Phi3ForCausalLM", gguf_arch="phi3", fused_qkv=True, fused_gate_up=True, top_level_original_max_position=True
    ),
}
ARCHITECTURES = {f.architecture: name for name, f in FAMILIES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE and its context-extension scaling, as transformers' `rope_parameters` describes them.

    `rope_type` picks the builder in `lcjax.positions`; the other fields are that builder's
    hyperparameters (unused ones stay None). `short_factor`/`long_factor` are LongRoPE's per-dimension
    rescale factors, `head_dim * partial_rotary_factor / 2` values each.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # yarn / longrope: None means "derive from factor", as transformers does
    attention_factor: float | None = None
    # longrope; n_hat (the first positions left unscaled) is LongRoPE's, not transformers': lcjax writes it as the
    # top-level config key LONGROPE_N_HAT_KEY, which transformers keeps but does not apply
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    n_hat: int = 0

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"Unsupported rope type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}.")
        needs = {
            "linear": ("factor",),
            "dynamic": ("factor",),
            "yarn": ("factor", "original_max_position_embeddings"),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
        }.get(self.rope_type, ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"rope type {self.rope_type!r} needs {', '.join(missing)} in its rope parameters.")
        if self.rope_type == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"longrope short_factor has {len(self.short_factor)} values but long_factor has "
                f"{len(self.long_factor)}; both must have rotary_dim/2 values."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama family.

    Sizes follow transformers' names. `family` names a `FAMILIES` entry (llama, mistral, qwen2, phi3): it decides
    how checkpoint tensors and `config.json` keys map onto lcjax's, never the forward pass.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}.")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA groups)."
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.partial_rotary_factor}) must be even and at most head_dim."
            )
        if self.rope.rope_type == "longrope" and len(self.rope.short_factor) != self.rotary_dim // 2:
            raise ValueError(
                f"longrope factors have {len(self.rope.short_factor)} values; this model's rotary dim "
                f"{self.rotary_dim} needs {self.rotary_dim // 2}."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}.")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * (h + 2 * kv) * hd + h * hd * d + (self.qkv_bias * (h + 2 * kv) * hd)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * layer + self.vocab_size * d + head + d

    def decode_params_read(self) -> int:
        """Parameters one decode step reads in full: all but an untied input embedding table, of which it
        gathers one row per sequence (tied, the output head reads the shared table whole)."""
        return self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    # ---- transformers config.json -------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a transformers `config.json` dict (transformers 4 or 5 layout)."""
        archs = hf.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            family = hf.get("model_type") if hf.get("model_type") in FAMILIES else None
        if family is None:
            raise ValueError(
                f"Unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}."
            )
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        sliding = hf.get("sliding_window")
        switch = FAMILIES[family].window_switch
        if switch is not None and not hf.get(switch, False):
            sliding = None  # e.g. Qwen2 configs carry a window size that is off unless use_sliding_window
        rope_params = _rope_parameters(hf)
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope=_rope_config(rope_params, hf),
            partial_rotary_factor=float(rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
            qkv_bias=bool(hf.get("attention_bias", FAMILIES[family].qkv_bias)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_config(hf)
        except KeyError as e:
            raise ValueError(f"{path} lacks the key {e.args[0]!r} that a model config needs.") from e

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers (v5 layout) `config.json` dict for this config."""
        family = FAMILIES[self.family]
        rope = {k: v for k, v in dataclasses.asdict(self.rope).items() if v is not None}
        rope["rope_theta"] = rope.pop("theta")
        rope.pop("n_hat")  # not a transformers rope parameter: written at the top level below
        if self.rope.rope_type != "yarn":
            rope.pop("truncate", None)
        for key in ("short_factor", "long_factor"):
            if key in rope:
                rope[key] = list(rope[key])
        if self.partial_rotary_factor != 1.0:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        hf = {
            "architectures": [family.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if family.writes_attention_bias:
            hf["attention_bias"] = self.qkv_bias
        if family.window_switch is not None:
            hf[family.window_switch] = self.sliding_window is not None
        if family.top_level_original_max_position and self.rope.original_max_position_embeddings:
            hf["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.rope.n_hat:
            hf[LONGROPE_N_HAT_KEY] = self.rope.n_hat
        return hf


LONGROPE_N_HAT_KEY = "lcjax_longrope_n_hat"


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Merges transformers 5's `rope_parameters` and transformers 4's `rope_scaling` + `rope_theta`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_theta" not in params and "rope_theta" in hf:
        params["rope_theta"] = hf["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def _rope_config(params: Mapping[str, Any], hf: Mapping[str, Any]) -> RopeConfig:
    rope_type = params.get("rope_type", "default")
    if rope_type == "su":  # the name early Phi-3 configs used for longrope
        rope_type = "longrope"
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    factor = params.get("factor")
    if rope_type == "longrope" and factor is None and original:
        factor = hf.get("max_position_embeddings", original) / original
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}.")

    def opt_float(key):
        return None if params.get(key) is None else float(params[key])

    def opt_tuple(key):
        return None if params.get(key) is None else tuple(float(x) for x in params[key])

    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", 10000.0)),
        factor=None if factor is None else float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=opt_float("low_freq_factor"),
        high_freq_factor=opt_float("high_freq_factor"),
        beta_fast=opt_float("beta_fast"),
        beta_slow=opt_float("beta_slow"),
        mscale=opt_float("mscale"),
        mscale_all_dim=opt_float("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        attention_factor=opt_float("attention_factor"),
        short_factor=opt_tuple("short_factor"),
        long_factor=opt_tuple("long_factor"),
        n_hat=int(hf.get(LONGROPE_N_HAT_KEY, 0)) if rope_type == "longrope" else 0,
    )


def llama3_8b_config(max_position_embeddings: int = 131072) -> ModelConfig:
    """Llama-3-8B's shape (used for benchmarks with random weights)."""
    return ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0),
    )


def with_longrope(
    config: ModelConfig,
    long_factor,
    max_position_embeddings: int,
    short_factor=None,
    n_hat: int = 0,
    original_max_position_embeddings: int | None = None,
) -> ModelConfig:
    """`config` extended by LongRoPE to `max_position_embeddings`: per-frequency `long_factor` (`rotary_dim // 2`
    values) past the original context, `short_factor` within it (None: ones, the model's own RoPE), the first
    `n_hat` positions unscaled (lcjax only). The original context is `config.max_position_embeddings` unless
    given (a model already extended keeps its first one). Exports as transformers' `rope_type: longrope`."""
    original = original_max_position_embeddings or config.rope.original_max_position_embeddings
    original = original or config.max_position_embeddings
    dims = config.rotary_dim // 2
    short = (1.0,) * dims if short_factor is None else tuple(float(x) for x in short_factor)
    long = tuple(float(x) for x in long_factor)
    if len(short) != dims or len(long) != dims:
        raise ValueError(f"LongRoPE needs {dims} short and long factors for rotary dim {config.rotary_dim}.")
    rope = RopeConfig(
        "longrope", config.rope.theta, factor=max_position_embeddings / original,
        original_max_position_embeddings=original, short_factor=short, long_factor=long, n_hat=int(n_hat),
    )  # fmt: skip
    return dataclasses.replace(config, rope=rope, max_position_embeddings=int(max_position_embeddings))


# the scalings a single factor defines, for extending a model's context (LongRoPE's searched factors: lcjax.methods)
FACTOR_SCALINGS = ("linear", "ntk", "dynamic", "yarn")


def extend_context(config: ModelConfig, rope_type: str, factor: float) -> ModelConfig:
    """`config` with its RoPE scaled for a context `factor` times its trained one: position interpolation
    ("linear"), static NTK-aware scaling ("ntk": the base theta grown by factor^(d / (d - 2)), so the lowest
    frequency is interpolated by `factor` and the highest kept), dynamic NTK ("dynamic") or YaRN ("yarn") over
    the model's plain RoPE, and `max_position_embeddings` multiplied by `factor` (but for dynamic NTK, which
    grows its base from the trained context as the input grows past it, and so keeps that context there, as
    transformers' dynamic configs do). The result exports as transformers writes such a config (static NTK as
    plain RoPE with the grown `rope_theta`)."""
    if rope_type not in FACTOR_SCALINGS:
        raise ValueError(f"rope scaling {rope_type!r} is not one of {', '.join(FACTOR_SCALINGS)}.")
    if factor <= 1:
        raise ValueError(f"a context extension factor must be > 1, got {factor}.")
    if config.rope.rope_type != "default":
        raise ValueError(
            f"the model's RoPE is already scaled ({config.rope.rope_type!r}); extend a model with plain RoPE."
        )
    original = config.max_position_embeddings
    if rope_type == "ntk":
        d = config.rotary_dim
        rope = dataclasses.replace(config.rope, theta=config.rope.theta * factor ** (d / (d - 2)))
    else:
        rope = dataclasses.replace(
            config.rope, rope_type=rope_type, factor=float(factor), original_max_position_embeddings=original
        )
    longest = original if rope_type == "dynamic" else int(original * factor)
    return dataclasses.replace(config, rope=rope, max_position_embeddings=longest)
