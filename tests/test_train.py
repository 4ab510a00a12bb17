"""The training step: the chunked loss against float64 numpy, accumulation over micro-batches equal to one larger
batch, rematerialisation that changes no gradient, a step sharded over 8 (fake CPU) devices equal to one device's,
and the learning-rate schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax.config import ModelConfig
from lcjax.models.params import param_shardings
from lcjax.models.transformer import Transformer
from lcjax.sharding import make_mesh
from lcjax.train import TrainConfig, causal_lm_loss, init_state, loss_and_count, train_step

CONFIG = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=128,
)  # fmt: skip
FP32 = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10, compute_dtype="float32", loss_chunk=5)


def batch(rng, micro, rows, seq):
    tokens = rng.integers(0, CONFIG.vocab_size, (micro, rows, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, (micro, rows)).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(lengths)


@pytest.fixture(scope="module")
def model():
    return Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32, std=0.2)


def test_chunked_loss_equals_float64_cross_entropy():
    rng = np.random.default_rng(0)
    hidden, head = rng.normal(size=(3, 11, 8)), rng.normal(size=(20, 8))
    tokens, lengths = rng.integers(0, 20, (3, 11)), np.array([11, 6, 2])
    logits = hidden @ head.T
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = sum(-logp[b, t, tokens[b, t + 1]] for b in range(3) for t in range(lengths[b] - 1))
    for chunk in (1, 4, 10, 64):  # chunks that divide seq - 1 and chunks that do not
        total, count = causal_lm_loss(
            jnp.asarray(hidden, jnp.float32),
            jnp.asarray(head, jnp.float32),
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            chunk,
        )
        assert count == 10 + 5 + 1
        np.testing.assert_allclose(total, want, rtol=1e-5)


def test_accumulating_micro_batches_equals_one_larger_batch(model):
    """Two micro-batches of 2 rows take the same step as one batch of 4: token-weighted mean loss, gradients and
    the parameters after the update."""
    tokens, lengths = batch(np.random.default_rng(1), 2, 2, 12)
    two = dataclasses.replace(FP32, micro_batches=2)
    s2, m2 = train_step(init_state(model.params, two), model, tokens, lengths, two)
    s1, m1 = train_step(init_state(model.params, FP32), model, tokens.reshape(1, 4, 12), lengths.reshape(1, 4), FP32)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m1["tokens"] == float(np.sum(np.asarray(lengths) - 1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s2.params, s1.params)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_changes_no_gradient(model, policy):
    tokens, lengths = batch(np.random.default_rng(2), 1, 2, 16)

    def grads(config):
        return jax.grad(lambda p: loss_and_count(p, model, tokens[0], lengths[0], config)[0])(model.params)

    plain = grads(dataclasses.replace(FP32, remat=None))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(
        dataclasses.replace(FP32, remat=policy)), plain)  # fmt: skip


@pytest.mark.skipif(jax.device_count() < 8, reason="a 2 x 4 mesh needs 8 devices (the CPU suite fakes them)")
def test_sharded_step_equals_the_single_device_step(model):
    """Parameters split over "model" by the logical-axis rules, the batch over "data": the same loss, gradient
    norm and updated parameters as on one device, and the state keeps its shardings."""
    tokens, lengths = batch(np.random.default_rng(3), 1, 4, 16)
    single, m1 = train_step(init_state(model.params, FP32), model, tokens, lengths, FP32)
    mesh = make_mesh(data=2, model=4)
    sharded = dataclasses.replace(model, params=jax.device_put(model.params, param_shardings(CONFIG, mesh)))
    state = init_state(sharded.params, FP32)
    expected = NamedSharding(mesh, P(None, "model", None, None))  # 4 query heads over the 4 "model" devices
    assert state.params["layers"]["wq"].sharding.is_equivalent_to(expected, 4)
    data = NamedSharding(mesh, P(None, "data"))
    state, m8 = train_step(state, sharded, jax.device_put(tokens, data), jax.device_put(lengths, data), FP32)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state.params, single.params)
    assert state.params["layers"]["wq"].sharding.is_equivalent_to(expected, 4)


def test_steps_lower_the_loss_on_a_repeated_batch(model):
    tokens, lengths = batch(np.random.default_rng(4), 1, 2, 16)
    config = dataclasses.replace(FP32, learning_rate=3e-2, total_steps=20)
    state = init_state(model.params, config)
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, model, tokens, lengths, config)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 8


def test_schedule_warms_up_then_decays_to_the_final_ratio():
    for decay in ("cosine", "linear"):
        lr = TrainConfig(learning_rate=1.0, warmup_steps=4, total_steps=14, decay=decay, final_lr_ratio=0.1).schedule()
        np.testing.assert_allclose([lr(0), lr(2), lr(4)], [0.0, 0.5, 1.0], atol=1e-6)
        np.testing.assert_allclose(lr(14), 0.1, atol=1e-6)
        assert lr(9) < lr(5) < 1.0
    with pytest.raises(ValueError, match="remat 'everything' is unknown"):
        TrainConfig(remat="everything")
