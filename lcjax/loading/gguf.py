"""Reads llama.cpp GGUF files: the model config and the weights, one tensor at a time.

`read_gguf_config` turns GGUF metadata into a transformers `config.json`-style dict (so
`ModelConfig.from_hf_config` serves both formats); `iter_gguf_tensors` yields every weight under its
transformers name, dequantised to float32 in transformers' `[out_features, in_features]` layout.

Two GGUF conventions matter here:
- ggml lists dimensions fastest-first, so a tensor whose `GGUFReader` `shape` is `[in, out]` is an
  `[out, in]` row-major matrix; `tensor.data` already has that numpy shape, except that quantised types
  come back as raw bytes per row (`[out, in_bytes]`).
- llama.cpp's converter permutes the rows of Llama's q/k projections from transformers' rotate-half RoPE
  layout to its interleaved one; we undo it. Qwen2 and Phi-3 files are not permuted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from lcjax.config import FAMILIES, ModelConfig
from lcjax.loading.safetensors import CheckpointError
from lcjax.models.checkpoint import checkpoint_layout

# llama.cpp's architecture names -> lcjax's families
GGUF_FAMILIES = {f.gguf_arch: name for name, f in FAMILIES.items() if f.gguf_arch is not None}

_Q = gguf.GGMLQuantizationType
# Types gguf.quants can turn into floats (plus the plain float types numpy reads directly).
SUPPORTED_TYPES = tuple(
    _Q[name]
    for name in (
        "F32",
        "F16",
        "BF16",
        "F64",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ1_S",
        "IQ1_M",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ3_XXS",
        "IQ3_S",
        "IQ4_NL",
        "IQ4_XS",
        "TQ1_0",
        "TQ2_0",
        "MXFP4",
    )
    if name in _Q.__members__
)

# Tensors that carry RoPE data for the config, not weights.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_qkv.bias": "self_attn.qkv_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


# ---- opening and metadata ---------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A `GGUFReader` over a memory map of `path`; errors name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader reports truncation as whatever numpy raises first
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt "
            f"({size} bytes), re-download or re-convert it."
        ) from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but the file has "
                f"{size}; it is truncated, re-download it."
            )
    return reader


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (str, number, bool, or list for arrays); `default` if absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _require(reader: gguf.GGUFReader, path: Path, key: str) -> Any:
    value = gguf_field(reader, key)
    if value is None:
        raise CheckpointError(
            f"{path}: GGUF metadata lacks {key!r}, which lcjax needs to build the model "
            "config; the file was written by an incomplete converter."
        )
    return value


def _scalar(path: Path, key: str, value: Any) -> Any:
    """Per-layer arrays with one repeated value collapse to that value (llama.cpp allows both)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key!r} varies per layer ({value}); lcjax needs one value for all.")
        return value[0]
    return value


def _hf_shape(tensor) -> tuple[int, ...]:
    # ggml dims are fastest-first; transformers' are slowest-first.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


# ---- config -----------------------------------------------------------------------------------------


def read_gguf_config(path: str | os.PathLike, reader: gguf.GGUFReader | None = None) -> dict[str, Any]:
    """A transformers `config.json`-style dict for the model in a GGUF file (llama, qwen2 or phi3).

    Sizes come from metadata, `vocab_size` from the `token_embd` shape, `tie_word_embeddings` from the
    absence of `output.weight`, `attention_bias` from the presence of q/qkv biases, and RoPE scaling from
    `*.rope.scaling.*` keys or the `rope_freqs` (Llama 3) / `rope_factors_*` (Phi-3 LongRoPE) tensors.
    """
    path = Path(path)
    return _read_config(reader or open_gguf(path), path)


def _read_config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_FAMILIES)}."
        )
    family = FAMILIES[GGUF_FAMILIES[arch]]

    def meta(key: str, default: Any = None) -> Any:
        return _scalar(path, f"{arch}.{key}", gguf_field(reader, f"{arch}.{key}", default))

    def need(key: str) -> Any:
        return _scalar(path, f"{arch}.{key}", _require(reader, path, f"{arch}.{key}"))

    tensors = {t.name: t for t in reader.tensors}
    hidden, n_layers = int(need("embedding_length")), int(need("block_count"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv") or n_heads)
    head_dim = _head_dim(tensors, meta("attention.key_length"), hidden, n_heads, n_kv)
    rope_dim = int(meta("rope.dimension_count") or head_dim)
    context = int(need("context_length"))
    theta = float(meta("rope.freq_base", 10000.0))

    if "token_embd.weight" in tensors:
        vocab = _hf_shape(tensors["token_embd.weight"])[0]
    else:
        vocab = meta("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise CheckpointError(
            f"{path}: cannot tell the vocabulary size (no token_embd.weight tensor, "
            f"no {arch}.vocab_size key, no tokenizer.ggml.tokens)."
        )

    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos_ids = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))
    sliding = meta("attention.sliding_window")
    sliding = int(sliding) if sliding else None  # Phi-3 files write 0 for "no window"

    config: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, path, arch, tensors, theta, rope_dim, context),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        "sliding_window": sliding,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": (eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        "pad_token_id": gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if rope_dim != head_dim:
        config["partial_rotary_factor"] = rope_dim / head_dim
    if family.window_switch is not None:
        config[family.window_switch] = sliding is not None
    if family.top_level_original_max_position and meta("rope.scaling.original_context_length"):
        config["original_max_position_embeddings"] = int(meta("rope.scaling.original_context_length"))
    return config


def _head_dim(tensors: dict, key_length: Any, hidden: int, n_heads: int, n_kv: int) -> int:
    """key_length when written, else read off the layer-0 q (or fused qkv) rows, else hidden/heads."""
    if key_length:
        return int(key_length)
    if "blk.0.attn_q.weight" in tensors:
        return _hf_shape(tensors["blk.0.attn_q.weight"])[0] // n_heads
    if "blk.0.attn_qkv.weight" in tensors:
        return _hf_shape(tensors["blk.0.attn_qkv.weight"])[0] // (n_heads + 2 * n_kv)
    return hidden // n_heads


def _rope_scaling(
    reader, path: Path, arch: str, tensors: dict, theta: float, rope_dim: int, context: int
) -> dict[str, Any] | None:
    def meta(key: str) -> Any:
        return gguf_field(reader, f"{arch}.rope.scaling.{key}")

    original = meta("original_context_length")
    if "rope_factors_long.weight" in tensors:  # Phi-3's LongRoPE factors
        if "rope_factors_short.weight" not in tensors or not original:
            raise CheckpointError(
                f"{path}: has rope_factors_long.weight but lacks rope_factors_short.weight "
                f"or {arch}.rope.scaling.original_context_length; LongRoPE needs all three."
            )
        long = _small_tensor(path, tensors["rope_factors_long.weight"])
        short = _small_tensor(path, tensors["rope_factors_short.weight"])
        factor = context / int(original)
        scaling = {
            "rope_type": "longrope",
            "factor": factor,
            "original_max_position_embeddings": int(original),
            "short_factor": short.tolist(),
            "long_factor": long.tolist(),
        }
        attn = meta("attn_factor")
        derived = float(np.sqrt(1 + np.log(factor) / np.log(int(original)))) if factor > 1 else 1.0
        if attn is not None and abs(float(attn) - derived) > 1e-5:  # llama.cpp writes the derived value
            scaling["attention_factor"] = float(attn)
        return scaling

    kind = meta("type")
    if kind in (None, "none"):
        if "rope_freqs.weight" in tensors:  # Llama 3's precomputed frequency divisors
            factors = _small_tensor(path, tensors["rope_freqs.weight"])
            return _llama3_from_freq_factors(path, factors, theta, rope_dim)
        return None
    factor = meta("factor")
    if factor is None:
        raise CheckpointError(
            f"{path}: {arch}.rope.scaling.type is {kind!r} but {arch}.rope.scaling.factor is missing."
        )
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original or context / float(factor)),
        }
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta(key) is not None:
                scaling[hf_key] = float(meta(key))
        return scaling
    raise CheckpointError(
        f"{path}: {arch}.rope.scaling.type {kind!r} is not supported; supported: none, "
        "linear, yarn (and Phi-3 LongRoPE / Llama 3 rope_freqs tensors)."
    )


def _small_tensor(path: Path, tensor) -> np.ndarray:
    return _dequantize(path, tensor).reshape(-1).astype(np.float64)


def _llama3_freq_factors(theta: float, dim: int, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling, `[dim // 2]` (what llama.cpp stores as rope_freqs)."""
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_from_freq_factors(path: Path, factors: np.ndarray, theta: float, dim: int) -> dict | None:
    """Recovers transformers' llama3 rope parameters from llama.cpp's precomputed `rope_freqs` tensor.

    Only two of (low_freq_factor, high_freq_factor, original context) are identifiable from the ramp,
    so low_freq_factor is fixed at 1 (every Llama 3.x release); the result is checked by recomputing.
    """
    if factors.shape != (dim // 2,):
        raise CheckpointError(f"{path}: rope_freqs.weight has shape {factors.shape}, expected ({dim // 2},).")
    factor = float(factors.max())
    if factor <= 1 + 1e-6:
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ramp = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    high, original = 4.0, 8192.0
    if ramp.sum() >= 2:
        # smooth = original/(high-1) * (1/wavelen) - 1/(high-1): a line in 1/wavelen
        smooth = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[ramp], smooth, 1)
        high = round(1 - 1 / intercept, 4)
        original = float(round(slope * (high - 1)))
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original),
    }
    expected = _llama3_freq_factors(theta, dim, factor, 1.0, high, original)
    if not np.allclose(expected, factors, rtol=1e-3):
        raise CheckpointError(
            f"{path}: rope_freqs.weight does not follow Llama 3 RoPE scaling (best fit "
            f"{params}); lcjax cannot represent these frequencies."
        )
    return params


# ---- tensors ----------------------------------------------------------------------------------------


def check_tensor_type(path: str | os.PathLike, name: str, qtype: gguf.GGMLQuantizationType) -> None:
    """Raises CheckpointError naming the file, tensor and type when lcjax cannot dequantise `qtype`."""
    if qtype not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has GGML type {qtype.name}, which lcjax cannot dequantise; supported: "
            f"{', '.join(t.name for t in SUPPORTED_TYPES)}. Re-quantise the model to one of those."
        )


def _dequantize(path: Path, tensor) -> np.ndarray:
    """float32 values of a tensor, shaped like `tensor.data` with bytes-per-row turned into elements."""
    check_tensor_type(path, tensor.name, tensor.tensor_type)
    if tensor.tensor_type == _Q.F64:
        return np.asarray(tensor.data, dtype=np.float32)
    try:
        out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} of type {tensor.tensor_type.name} cannot be "
            f"dequantised by this gguf package ({e}); upgrade gguf."
        ) from e
    if tensor.tensor_type == _Q.F32:
        return np.array(out, dtype=np.float32)  # a read-only view of the memory map: hand out a copy
    return np.asarray(out, dtype=np.float32)


def gguf_to_hf_name(name: str, arch: str) -> str | None:
    """The transformers name of GGUF tensor `name` (None if it has no counterpart).

    Phi-3 files keep transformers' fused projections: `attn_qkv` is `qkv_proj` and `ffn_up` holds
    `gate_up_proj` (gate rows first, then up).
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in _LAYER_NAMES:
        return None
    rest = _LAYER_NAMES[m.group(2)]
    if FAMILIES[GGUF_FAMILIES[arch]].fused_gate_up and rest == "mlp.up_proj.weight":
        rest = "mlp.gate_up_proj.weight"
    return f"model.layers.{m.group(1)}.{rest}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs -> transformers' rotate-half halves).

    w: `[n_heads * head_dim, ...]` (a weight `[n_heads*head_dim, hidden]` or a bias `[n_heads*head_dim]`).
    The converter did `w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)`; this is its inverse.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(
    path: str | os.PathLike, reader: gguf.GGUFReader | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(transformers name, float32 array)` for each weight in a GGUF file, in file order.

    Arrays are in transformers layout (`[out_features, in_features]` for matrices; Llama q/k rows
    un-permuted), dequantised one at a time so peak host memory is about one float32 tensor. RoPE
    tensors (`rope_freqs`, `rope_factors_*`) are skipped: `read_gguf_config` folds them into the config.
    Raises CheckpointError naming the file and tensor for an unknown tensor, a shape that disagrees with
    the metadata, or a type lcjax cannot dequantise.
    """
    path = Path(path)
    reader = reader or open_gguf(path)
    config = _read_config(reader, path)
    model_config = ModelConfig.from_hf_config(config)
    arch = config["model_type"]
    layout = checkpoint_layout(model_config)
    permuted = FAMILIES[model_config.family].gguf_rope_permuted
    if reader.byte_order != "I":
        raise CheckpointError(
            f"{path}: the file's byte order differs from this machine's; lcjax reads only native-endian GGUF files."
        )
    for tensor in reader.tensors:
        if tensor.name in _ROPE_TENSORS:
            continue
        hf_name = gguf_to_hf_name(tensor.name, arch)
        expected = None if hf_name is None or hf_name not in layout else layout[hf_name].shape
        if expected is None:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has no transformers counterpart in a "
                f"{arch} model with {config['num_hidden_layers']} layers; lcjax cannot "
                "load this file."
            )
        shape = _hf_shape(tensor)
        if shape != expected:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} ({hf_name}) has shape {shape} but the file's "
                f"metadata implies {expected}; the file is inconsistent."
            )
        array = _dequantize(path, tensor).reshape(shape)
        if permuted and ".self_attn.q_proj." in hf_name:
            array = unpermute_rope_rows(array, config["num_attention_heads"])
        elif permuted and ".self_attn.k_proj." in hf_name:
            array = unpermute_rope_rows(array, config["num_key_value_heads"])
        yield hf_name, array
