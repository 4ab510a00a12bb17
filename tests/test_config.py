"""ModelConfig from transformers config.json dicts (v4 and v5 layouts) and its error messages."""

import dataclasses

import numpy as np
import pytest

from lcjax.config import ModelConfig, RopeConfig, extend_context

LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def test_llama31_from_transformers4_and_5_layouts_agree():
    v4 = ModelConfig.from_hf_config(LLAMA31_V4)
    v5_dict = {k: v for k, v in LLAMA31_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5_dict["rope_parameters"] = dict(LLAMA31_V4["rope_scaling"], rope_theta=500000.0)
    v5 = ModelConfig.from_hf_config(v5_dict)
    assert v4 == v5
    assert v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0 and v4.rope.factor == 8.0
    assert v4.head_dim == 128 and v4.q_per_kv == 4 and v4.eos_token_ids == (128001, 128008, 128009)
    assert abs(v4.num_params() - 8.03e9) < 0.01e9


def test_to_hf_config_round_trips():
    cfg = ModelConfig.from_hf_config(LLAMA31_V4)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    phi = dataclasses.replace(
        cfg,
        family="phi3",
        rope=RopeConfig(
            "longrope",
            10000.0,
            short_factor=(1.0,) * 64,
            long_factor=(2.0,) * 64,
            original_max_position_embeddings=4096,
        ),
    )
    assert ModelConfig.from_hf_config(phi.to_hf_config()) == dataclasses.replace(
        phi, rope=dataclasses.replace(phi.rope, factor=131072 / 4096)
    )


def test_phi3_su_and_qwen2_window_switch():
    phi = dict(
        LLAMA31_V4,
        architectures=["Phi3ForCausalLM"],
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": [1.0] * 64, "long_factor": [3.0] * 64},
    )
    cfg = ModelConfig.from_hf_config(phi)
    assert cfg.family == "phi3" and cfg.rope.rope_type == "longrope"
    assert cfg.rope.original_max_position_embeddings == 4096 and cfg.rope.factor == 32.0
    qwen = dict(
        LLAMA31_V4, architectures=["Qwen2ForCausalLM"], rope_scaling=None, sliding_window=4096, use_sliding_window=False
    )
    q = ModelConfig.from_hf_config(qwen)
    assert q.sliding_window is None and q.qkv_bias


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"Unsupported architecture.*GPT2.*LlamaForCausalLM.*Phi3ForCausalLM"):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, architectures=["GPT2LMHeadModel"], model_type="gpt2"))


def test_unknown_rope_type_lists_supported():
    with pytest.raises(ValueError, match=r"Unsupported rope type 'mrope'.*longrope"):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, rope_scaling={"rope_type": "mrope"}))


def test_missing_rope_parameter_is_named():
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_longrope_factor_length_must_match_rotary_dim():
    phi = dict(
        LLAMA31_V4,
        architectures=["Phi3ForCausalLM"],
        original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 10, "long_factor": [3.0] * 10},
    )
    with pytest.raises(ValueError, match="needs 64"):
        ModelConfig.from_hf_config(phi)


def test_bad_gqa_ratio():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, num_key_value_heads=5))


def test_missing_key_in_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"config.json lacks the key 'num_attention_heads'"):
        ModelConfig.from_json_file(path)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_extend_context_scales_rope_and_the_context_and_round_trips(kind):
    plain = dataclasses.replace(ModelConfig.from_hf_config(LLAMA31_V4), rope=RopeConfig("default", 500000.0))
    plain = dataclasses.replace(plain, max_position_embeddings=8192)
    longer = extend_context(plain, kind, 4)
    assert longer.max_position_embeddings == (8192 if kind == "dynamic" else 32768) and longer.rope.factor == 4.0
    assert longer.rope.original_max_position_embeddings == 8192 and longer.rope.rope_type == kind
    assert ModelConfig.from_hf_config(longer.to_hf_config()) == longer
    with pytest.raises(ValueError, match="already scaled \\('" + kind):
        extend_context(longer, kind, 2)
    with pytest.raises(ValueError, match="must be > 1"):
        extend_context(plain, kind, 0.5)


def test_static_ntk_grows_the_base_so_the_lowest_frequency_is_interpolated_by_the_factor():
    plain = dataclasses.replace(ModelConfig.from_hf_config(LLAMA31_V4), rope=RopeConfig("default", 10000.0))
    ntk = extend_context(plain, "ntk", 4)
    d = plain.rotary_dim
    lowest = lambda c: c.rope.theta ** (-(d - 2) / d)  # the inv_freq of the last pair
    np.testing.assert_allclose(lowest(plain) / lowest(ntk), 4.0, rtol=1e-12)
    assert ntk.rope.rope_type == "default" and ntk.max_position_embeddings == 4 * plain.max_position_embeddings
    assert ModelConfig.from_hf_config(ntk.to_hf_config()) == ntk


def test_dynamic_ntk_grows_its_base_from_the_trained_context():
    """At 4x the trained context the base is theta * (s * seq / trained - (s - 1))^(d / (d - 2)) (transformers'
    dynamic NTK), and within the trained context it is plain RoPE: a transform built with the extended context in
    place of the trained one would stay plain up to it."""
    from lcjax import positions

    plain = dataclasses.replace(ModelConfig.from_hf_config(LLAMA31_V4), rope=RopeConfig("default", 10000.0))
    plain = dataclasses.replace(plain, max_position_embeddings=1024)
    dyn = positions.from_config(extend_context(plain, "dynamic", 4))
    d = plain.rotary_dim
    pos = np.arange(4096)[None]
    base = 10000.0 * (4 * 4096 / 1024 - 3) ** (d / (d - 2))
    angles = pos[..., None] * (1.0 / base ** (np.arange(0, d, 2) / d))[None, None]
    got = np.asarray(dyn(pos).cos)
    np.testing.assert_allclose(got, np.cos(angles), atol=1e-3)  # float32 angles of up to 4096 radians
    assert np.abs(got - np.asarray(positions.from_config(plain)(pos).cos)).max() > 0.5
    short = np.arange(1024)[None]
    np.testing.assert_allclose(
        np.asarray(dyn(short).cos), np.asarray(positions.from_config(plain)(short).cos), atol=1e-4
    )
