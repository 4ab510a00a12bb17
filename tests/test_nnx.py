"""The Flax NNX face of the decoder: the same logits as `Transformer`, gradients under `nnx.jit` equal to the
trainer's functional ones, LoRA adapters that start as a no-op and train alone, and Param sharding metadata that
agrees with `lcjax.sharding.logical_to_spec`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lcjax.config import ModelConfig
from lcjax.models.nnx import Decoder
from lcjax.models.params import param_specs
from lcjax.models.transformer import Transformer
from lcjax.sharding import logical_to_spec, make_mesh
from lcjax.train import TrainConfig, loss_and_count
from lcjax.train.loss import next_token_targets

CONFIG = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=128,
)  # fmt: skip
FP32 = TrainConfig(compute_dtype="float32", remat=None)


@pytest.fixture(scope="module")
def model():
    return Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32, std=0.2)


def batch(seed: int, rows: int = 3, seq: int = 12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (rows, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, (rows,)).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def summed_loss(decoder: Decoder, tokens, lengths):
    """The summed next-token cross entropy `loss_and_count` computes, from the decoder's logits."""
    targets, valid = next_token_targets(tokens, lengths)
    losses = optax.softmax_cross_entropy_with_integer_labels(decoder(tokens, lengths), targets)
    return jnp.sum(jnp.where(valid, losses, 0.0))


def param_values(decoder: Decoder) -> dict:
    return nnx.to_pure_dict(nnx.state(decoder, nnx.Not(nnx.LoRAParam)))["params"]


def test_decoder_from_model_gives_the_models_logits_and_round_trips(model):
    tokens, lengths = batch(0)
    decoder = Decoder.from_model(model)
    np.testing.assert_array_equal(decoder(tokens, lengths), model(tokens, lengths))
    np.testing.assert_array_equal(decoder(tokens), model(tokens))
    back = decoder.to_model()
    assert back.config == model.config and back.positions == model.positions and back.attention == model.attention
    assert jax.tree.structure(back.params) == jax.tree.structure(model.params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)))  # no copies


def test_decoder_random_init_follows_the_param_declarations():
    decoder = Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    specs = param_specs(CONFIG)
    values = param_values(decoder)
    assert jax.tree.structure(values) == jax.tree.structure(specs, is_leaf=lambda s: hasattr(s, "axes"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(values))
    np.testing.assert_array_equal(values["layers"]["attn_norm"], 1)
    with pytest.raises(ValueError, match="rngs="):
        Decoder(CONFIG)


def test_nnx_jit_gradients_equal_the_functional_trainers(model):
    tokens, lengths = batch(2)
    decoder = Decoder.from_model(model)
    loss, grads = nnx.jit(nnx.value_and_grad(summed_loss))(decoder, tokens, lengths)
    reference = jax.value_and_grad(lambda p: loss_and_count(p, model, tokens, lengths, FP32), has_aux=True)
    (want_loss, _), want = jax.jit(reference)(model.params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = nnx.to_pure_dict(grads)["params"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


def test_lora_starts_as_a_no_op_and_trains_alone(model):
    tokens, lengths = batch(3)
    decoder = Decoder.from_model(model)
    decoder.add_lora(4, ("wq", "wo"), alpha=8.0, rngs=nnx.Rngs(1))
    assert decoder.lora["wq"]["a"].shape == (2, 4, 32) and decoder.lora["wq"]["b"].shape == (2, 4, 8, 4)
    assert decoder.lora["wo"]["a"].shape == (2, 4, 4, 8) and decoder.lora["wo"]["b"].shape == (2, 32, 4)
    np.testing.assert_array_equal(decoder(tokens, lengths), model(tokens, lengths))

    base = param_values(decoder)
    optimizer = nnx.Optimizer(decoder, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(decoder, optimizer, tokens, lengths):
        loss, grads = nnx.value_and_grad(summed_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(decoder, tokens, lengths)
        optimizer.update(decoder, grads)
        return loss

    losses = [float(step(decoder, optimizer, tokens, lengths)) for _ in range(6)]  # each before its update
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, param_values(decoder), base)  # base weights bit-identical
    assert np.abs(decoder.lora["wq"]["b"].get_value()).max() > 0
    # the merged model computes what the adapted decoder does; the unmerged one is the base model
    np.testing.assert_allclose(decoder.to_model()(tokens, lengths), decoder(tokens, lengths), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(decoder.to_model(merge=False)(tokens, lengths), model(tokens, lengths))


def test_param_metadata_gives_the_logical_rules_partition_specs(model):
    mesh = make_mesh(fsdp=2, tensor=4)
    decoder = Decoder.from_model(model, mesh=mesh)
    decoder.add_lora(2, ("wq", "w_down"), rngs=nnx.Rngs(1))
    got = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(decoder)))
    specs = param_specs(CONFIG)
    want = jax.tree.map(lambda s: logical_to_spec(s.shape, s.axes, mesh), specs, is_leaf=lambda s: hasattr(s, "axes"))
    assert got["params"] == want
    assert want["layers"]["wk"] == P(None, None, None, "fsdp")  # 2 KV heads on 4 "tensor" devices: replicated
    assert got["lora"]["wq"] == {"a": P(None, None, "fsdp"), "b": P(None, "tensor", None, None)}
    assert got["lora"]["w_down"] == {"a": P(None, None, "tensor"), "b": P(None, "fsdp", None)}
    placed = jax.tree.map(lambda x: x.sharding.spec, nnx.to_pure_dict(nnx.state(decoder)))
    assert placed == got
    # a model already on the mesh (as `load_model(mesh=...)` places it) is wrapped on that mesh
    again = Decoder.from_model(decoder.to_model(merge=False))
    assert again.mesh == mesh and nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(again)))["params"] == want
    # without a mesh the metadata is the logical names and rules, Flax's convention
    plain = nnx.get_partition_spec(nnx.state(Decoder.from_model(model)))
    assert nnx.to_pure_dict(plain)["params"]["layers"]["wq"] == P(None, "tensor", None, "fsdp")
