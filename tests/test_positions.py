"""Position transforms against transformers' rotary embeddings (cos/sin tables from tools/make_fixtures.py)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from lcjax import positions
from lcjax.config import ModelConfig

ROPE = FIXTURES / "rope"


ARCH = {"LlamaConfig": "LlamaForCausalLM", "Phi3Config": "Phi3ForCausalLM"}


def rope_cases():
    configs = json.loads((ROPE / "rope_configs.json").read_text())
    return sorted(configs.items())


def hf_config(entry: dict) -> dict:
    """A minimal transformers config dict around the fixture's rope parameters."""
    return {
        "architectures": [ARCH[entry["config_class"]]],
        "vocab_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "hidden_size": entry["hidden_size"],
        "head_dim": entry["head_dim"],
        "num_attention_heads": entry["num_attention_heads"],
        "max_position_embeddings": entry["max_position_embeddings"],
        "original_max_position_embeddings": entry["original_max_position_embeddings"],
        "rope_parameters": entry["rope_parameters"],
    }


@pytest.mark.parametrize("name,entry", rope_cases())
def test_cos_sin_match_transformers(name, entry):
    ref = np.load(ROPE / "rope_reference.npz")
    cfg = ModelConfig.from_hf_config(hf_config(entry))
    transform = positions.from_config(cfg)
    for case in entry["cases"]:
        cos_ref, sin_ref = ref[f"{name}/{case}/cos"], ref[f"{name}/{case}/sin"]
        pos = np.arange(cos_ref.shape[1])[None]
        rot = transform(jnp.asarray(pos, jnp.int32))
        half = cos_ref.shape[-1] // 2
        # transformers repeats the half table: cat(freqs, freqs)
        np.testing.assert_allclose(np.asarray(rot.cos), cos_ref[..., :half], atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(rot.sin), sin_ref[..., :half], atol=2e-5, rtol=0)


def test_angles_stay_float32_at_long_range():
    """bf16 positions would be off by whole radians at 100K; fp32 angles stay within 1e-2 of float64."""
    transform = positions.rope(128, 500000.0)
    pos = np.array([[100_000, 131_071]])
    rot = transform(jnp.asarray(pos, jnp.int32))
    inv = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    exact = pos[..., None] * inv
    np.testing.assert_allclose(np.asarray(rot.cos), np.cos(exact), atol=2e-2)
    assert rot.cos.dtype == jnp.float32


def test_longrope_switches_at_original_window():
    t = positions.longrope(
        8,
        10000.0,
        short_factor=[1.0] * 4,
        long_factor=[4.0] * 4,
        original_max_position_embeddings=64,
        max_position_embeddings=256,
    )
    short = t(jnp.arange(64)[None])
    long = t(jnp.arange(65)[None])
    np.testing.assert_allclose(
        np.asarray(short.cos[0, 10]),
        np.asarray(positions.rope(8)(jnp.array([[10]])).cos[0, 0]) * t.attention_factor,
        rtol=1e-6,
    )
    assert not np.allclose(np.asarray(short.cos[0, 10]), np.asarray(long.cos[0, 10]))
    assert t.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))


def test_rotary_apply_rotates_pairs_and_passes_the_rest():
    """Rotation by angle a of the pair (x_i, x_{i+half}), with dims past rotary_dim untouched."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 10)).astype(np.float32)
    t = positions.rope(8, 100.0)  # partial: 8 of 10 dims rotate
    pos = np.array([[0, 5, 17]])
    out = np.asarray(t(jnp.asarray(pos)).apply(jnp.asarray(x)))
    inv = 1.0 / (100.0 ** (np.arange(0, 8, 2) / 8))
    ang = pos[0][:, None] * inv  # [seq, 4]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :4], x[..., 4:8]
    np.testing.assert_allclose(out[..., :4], x1 * c - x2 * s, atol=1e-5)
    np.testing.assert_allclose(out[..., 4:8], x2 * c + x1 * s, atol=1e-5)
    np.testing.assert_array_equal(out[..., 8:], x[..., 8:])
