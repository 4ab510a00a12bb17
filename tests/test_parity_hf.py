"""Full-model parity with transformers (float32) on tiny random-weight checkpoints that transformers saved.

Fixtures come from `tools/make_fixtures.py` (transformers + torch, Python 3.11): sharded safetensors,
float32 logits and 16 greedy tokens per family. lcjax must match the logits to 1e-4 and the tokens exactly.
"""

import numpy as np
import pytest
from conftest import FIXTURES

import lcjax
from lcjax.generate import generate

FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "phi3"]


def load(name):
    path = FIXTURES / "hf" / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing; regenerate with tools/make_fixtures.py")
    model, tokenizer = lcjax.load_model(path, dtype="float32")
    return model, tokenizer, np.load(path / "reference.npz")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
    model, _, ref = load(name)
    logits = np.asarray(model(ref["input_ids"]))
    assert logits.shape == ref["logits"].shape
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    prefill_logits, cache = model.prefill(ref["input_ids"])
    np.testing.assert_allclose(np.asarray(prefill_logits), ref["logits"], atol=1e-4, rtol=0)
    assert list(np.asarray(cache.lengths)) == [ref["input_ids"].shape[1]] * ref["input_ids"].shape[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_match_transformers(name):
    model, _, ref = load(name)
    (tokens,), _ = generate(model, ref["prompt_ids"][0], ref["greedy_ids"].shape[1], stop_tokens=())
    assert tokens == ref["greedy_ids"][0].tolist()


def test_phi3_longrope_beyond_original_window():
    model, _, ref = load("phi3")
    assert model.config.rope.rope_type == "longrope"
    long_ids = ref["input_ids_long"]
    assert long_ids.shape[1] > model.config.rope.original_max_position_embeddings
    np.testing.assert_allclose(np.asarray(model(long_ids)), ref["logits_long"], atol=1e-4, rtol=0)


def test_mistral_sequence_longer_than_window():
    model, _, ref = load("mistral")
    assert model.config.sliding_window is not None
    assert ref["input_ids"].shape[1] > model.config.sliding_window
    # the window matters: without it the logits differ
    import dataclasses

    unwindowed = lcjax.Transformer(model.params, dataclasses.replace(model.config, sliding_window=None))
    assert np.abs(np.asarray(unwindowed(ref["input_ids"])) - ref["logits"]).max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_fused_mlp_keeps_transformers_outputs_and_exports_the_same_checkpoint(name, tmp_path):
    """`with_fused_mlp` (gate and up in one `w_gate_up`), stacked and unstacked: transformers' logits and greedy
    tokens still; exported, it loads back (unfused) to the same weights as the model it came from."""
    import jax

    from lcjax.loading.export import save_checkpoint

    model, _, ref = load(name)
    for fused in (model.with_fused_mlp(), model.with_layer_layout("unstacked").with_fused_mlp()):
        layers = fused.params["layers"]
        for layer in layers if isinstance(layers, tuple) else (layers,):
            assert "w_gate_up" in layer and "w_gate" not in layer and "w_up" not in layer
        np.testing.assert_allclose(np.asarray(fused(ref["input_ids"])), ref["logits"], atol=1e-4, rtol=0)
    (tokens,), _ = generate(fused, ref["prompt_ids"][0], ref["greedy_ids"].shape[1], stop_tokens=())
    assert tokens == ref["greedy_ids"][0].tolist()
    jax.tree.map(np.testing.assert_array_equal, fused.with_fused_mlp().params, fused.params)  # fusing twice: same
    save_checkpoint(model.with_fused_mlp().params, model.config, tmp_path)
    reloaded, _ = lcjax.load_model(tmp_path, dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, model.params)
