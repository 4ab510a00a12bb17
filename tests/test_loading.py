"""Checkpoint loading: round trip through safetensors shards, mesh placement, and errors that name the problem."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lcjax
from lcjax.config import ModelConfig
from lcjax.loading.assemble import assemble_params
from lcjax.loading.export import hf_tensors, save_checkpoint
from lcjax.loading.safetensors import CheckpointError
from lcjax.models.checkpoint import checkpoint_layout
from lcjax.models.params import param_specs
from lcjax.models.transformer import Transformer
from lcjax.sharding import make_mesh

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)


def tiny_model(family="llama", **kw) -> Transformer:
    cfg = ModelConfig(family=family, **dict(TINY, **kw))
    return Transformer.init(cfg, jax.random.key(1), dtype=jnp.float32, std=0.3)


def edit_config(path, **changes):
    """Rewrites the checkpoint's config.json with `changes`, so it no longer matches the weights."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model()
    save_checkpoint(model.params, model.config, tmp_path / "ckpt", max_shard_bytes=20_000)
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", {}),
        ("qwen2", {"qkv_bias": True, "tie_word_embeddings": True}),
        ("phi3", {}),
        ("mistral", {"sliding_window": 5}),
    ],
)
def test_round_trip_through_sharded_safetensors(tmp_path, family, kw):
    model = tiny_model(family, **kw)
    if model.config.qkv_bias:  # zero-initialised biases would not prove they load
        layers = dict(model.params["layers"], bq=model.params["layers"]["wq"][..., 0] + 0.5)
        model = Transformer(dict(model.params, layers=layers), model.config)
    shards = save_checkpoint(model.params, model.config, tmp_path, max_shard_bytes=20_000)
    assert len(shards) > 1
    loaded, tokenizer = lcjax.load_model(tmp_path, dtype="float32", layer_layout="stacked")  # as tiny_model's
    assert tokenizer is None and loaded.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
    tokens = np.arange(20).reshape(2, 10) % TINY["vocab_size"]
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-6)


def test_unstacked_load_builds_per_layer_arrays_directly(checkpoint):
    """layer_layout="unstacked" (the GPU default) writes each layer's own arrays as it reads them: equal to
    unstacking the stacked load, with no stacked copy made on the way."""
    from lcjax.models.params import unstack_layers

    model, path = checkpoint
    loaded, _ = lcjax.load_model(path, dtype="float32", layer_layout="unstacked")
    assert loaded.layer_layout == "unstacked" and len(loaded.params["layers"]) == model.config.num_layers
    jax.tree.map(np.testing.assert_array_equal, loaded.params, unstack_layers(model.params))
    tokens = np.arange(20).reshape(2, 10) % TINY["vocab_size"]
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-6)


def test_bfloat16_load_casts(checkpoint):
    model, path = checkpoint
    loaded, _ = lcjax.load_model(path)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.params))
    np.testing.assert_allclose(np.asarray(loaded.params["embed"], np.float32), model.params["embed"], rtol=1e-2)


@pytest.mark.skipif(jax.device_count() < 8, reason="a 2 x 4 mesh needs 8 devices (the CPU suite fakes them)")
def test_load_onto_mesh_shards_by_logical_axes(checkpoint):
    model, path = checkpoint
    mesh = make_mesh(data=2, tensor=4)
    loaded, _ = lcjax.load_model(path, dtype="float32", mesh=mesh)
    layers = loaded.params["layers"]
    assert layers["wq"].sharding.spec == P(None, "tensor", None, None)  # 4 q heads over 4 devices
    assert layers["wk"].sharding.spec == P(None, None, None, None)  # 2 kv heads: replicated, not an error
    assert layers["w_gate"].sharding.spec == P(None, "tensor", None)
    assert loaded.params["embed"].sharding.spec == P("tensor", None)
    tokens = np.arange(24).reshape(2, 12) % TINY["vocab_size"]
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-5)
    # fusing the MLP's gate and up keeps their split over "tensor" (stacked and unstacked layers)
    for fused in (loaded.with_fused_mlp(), loaded.with_layer_layout("unstacked").with_fused_mlp()):
        layers = fused.params["layers"]
        first = layers[0] if isinstance(layers, tuple) else layers
        assert first["w_gate_up"].sharding.spec == (
            P(None, "tensor", None) if isinstance(layers, tuple) else P(None, None, "tensor", None)
        )
        np.testing.assert_allclose(fused(tokens), model(tokens), atol=1e-5)


def test_missing_shard_is_named(checkpoint):
    _, path = checkpoint
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        lcjax.load_model(path)


def test_truncated_shard_is_named(checkpoint):
    _, path = checkpoint
    shard = sorted(path.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        lcjax.load_model(path)


def test_wrong_shape_names_file_and_tensor(checkpoint):
    _, path = checkpoint
    edit_config(path, intermediate_size=64)
    with pytest.raises(
        CheckpointError, match=r"safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"
    ):
        lcjax.load_model(path)


def test_unexpected_tensor_is_named(checkpoint):
    _, path = checkpoint
    edit_config(path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\."):
        lcjax.load_model(path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    model, path = checkpoint
    index = json.loads((path / "model.safetensors.index.json").read_text())
    edit_config(path, num_hidden_layers=3)
    # named as the checkpoint names it, not by lcjax's parameter names
    with pytest.raises(CheckpointError, match=r"missing 9 tensor\(s\): model\.layers\.2\.input_layernorm\.weight, "):
        lcjax.load_model(path)
    assert index["weight_map"]


def test_a_tensor_given_twice_is_named(checkpoint):
    model, path = checkpoint
    tensors = [(name, array, "a.safetensors") for name, array in hf_tensors(model.params, model.config)]
    with pytest.raises(
        CheckpointError,
        match=r"b\.safetensors: tensor 'model\.norm\.weight' appears again "
        r"\(first in a\.safetensors\)",
    ):
        norm = dict((name, array) for name, array, _ in tensors)["model.norm.weight"]
        assemble_params(model.config, tensors + [("model.norm.weight", norm, "b.safetensors")])


@pytest.mark.parametrize(
    "family,kw", [("llama", {}), ("qwen2", {"qkv_bias": True, "tie_word_embeddings": True}), ("phi3", {})]
)
def test_checkpoint_layout_fills_every_parameter_once(family, kw):
    """The one checkpoint map covers every parameter of `param_specs` exactly once, each tensor's rows whole and
    in order; Phi-3's fused tensors fill q, k, v and gate, up from their row ranges."""
    config = ModelConfig(family=family, **dict(TINY, **kw))
    layout = checkpoint_layout(config)
    filled = collections.Counter()
    for tensor in layout.values():
        assert tensor.parts[0].start == 0 and tensor.parts[-1].stop == tensor.shape[0]
        assert all(a.stop == b.start for a, b in zip(tensor.parts, tensor.parts[1:]))
        filled.update((part.path, part.layer) for part in tensor.parts)
    specs = param_specs(config)
    want = {(("layers", n), i) for n in specs["layers"] for i in range(config.num_layers)}
    want |= {((n,), None) for n in specs if n != "layers"}
    assert set(filled) == want and set(filled.values()) == {1}
    fused = "model.layers.1.self_attn.qkv_proj.weight"
    assert (fused in layout) == (family == "phi3")
    if family == "phi3":
        H, K, Hd, D, F = 4, 2, 8, 32, 48
        assert layout[fused].shape == ((H + 2 * K) * Hd, D)
        assert [(p.path[-1], p.start, p.stop) for p in layout[fused].parts] == [
            ("wq", 0, H * Hd),
            ("wk", H * Hd, (H + K) * Hd),
            ("wv", (H + K) * Hd, (H + 2 * K) * Hd),
        ]
        gate_up = layout["model.layers.0.mlp.gate_up_proj.weight"]
        assert [(p.path[-1], p.start, p.stop) for p in gate_up.parts] == [("w_gate", 0, F), ("w_up", F, 2 * F)]


def test_missing_path_and_builtin_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in name"):
        lcjax.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        lcjax.load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        lcjax.load_model(tmp_path, dtype="int8")
