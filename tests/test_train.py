"""The training step: the chunked loss against float64 numpy, accumulation over micro-batches equal to one larger
batch, rematerialisation that changes no gradient, steps sharded over 8 (fake CPU) devices along each mesh axis and
all of them equal to one device's, context parallelism's order and attention, and the learning-rate schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax.config import ModelConfig
from lcjax.models.context_parallel import load_balanced_order
from lcjax.models.params import param_shardings
from lcjax.models.transformer import Transformer
from lcjax.numerics import attention_mask, positional_attention, xla_attention
from lcjax.sharding import logical_sharding, make_mesh
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


def test_the_loss_gradients_equal_autodiff_of_plain_cross_entropy():
    """The hand-written gradient (computed beside the loss, the logits' gradient in the compute dtype) against
    jax.grad of the unchunked fp32 loss; in bf16 the hidden state's gradient stays bf16 and the head's is fp32."""
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(30, 8)), jnp.float32)
    tokens, lengths = jnp.asarray(rng.integers(0, 30, (2, 13))), jnp.asarray([13, 7])

    def plain(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("bsd,vd->bsv", h[:, :-1], w), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(jnp.arange(12)[None] < lengths[:, None] - 1, picked, 0.0))

    want = jax.grad(plain, (0, 1))(hidden, head)
    chunked = jax.grad(lambda h, w: causal_lm_loss(h, w, tokens, lengths, 4)[0], (0, 1))
    for g, w in zip(chunked(hidden, head), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    dh, dw = chunked(hidden.astype(jnp.bfloat16), head)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(dw, want[1], rtol=0.05, atol=0.05)


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


@pytest.mark.parametrize("policy", ["nothing_saveable", "save_attention", "dots_with_no_batch_dims_saveable"])
def test_remat_changes_no_gradient(model, policy):
    tokens, lengths = batch(np.random.default_rng(2), 1, 2, 16)

    def grads(config):
        return jax.grad(lambda p: loss_and_count(p, model, tokens[0], lengths[0], config)[0])(model.params)

    plain = grads(dataclasses.replace(FP32, remat=None))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads(
        dataclasses.replace(FP32, remat=policy)), plain)  # fmt: skip


def test_fused_projections_change_no_loss_or_gradient(model):
    tokens, lengths = batch(np.random.default_rng(4), 1, 2, 16)

    def value_and_grads(config):
        return jax.value_and_grad(lambda p: loss_and_count(p, model, tokens[0], lengths[0], config)[0])(model.params)

    (plain, g_plain), (fused, g_fused) = (value_and_grads(dataclasses.replace(FP32, fuse_projections=f)) for f in
                                          (False, True))  # fmt: skip
    np.testing.assert_allclose(fused, plain, rtol=1e-6)
    # the fused products sum the input gradients in another order: fp32 noise only
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_fused, g_plain)


MESHES = {
    "data": dict(data=8),
    "fsdp": dict(fsdp=8),
    "tensor": dict(tensor=2),
    "context": dict(context=8),
    "fsdp x tensor x context": dict(fsdp=2, tensor=2, context=2),
}


@pytest.mark.skipif(jax.device_count() < 8, reason="the meshes need 8 devices (the CPU suite fakes them)")
@pytest.mark.parametrize("axes", list(MESHES))
def test_sharded_step_equals_the_single_device_step(model, axes):
    """Each mesh axis alone, and fsdp x tensor x context together, take the single-device step: the same loss,
    gradient norm and updated parameters, with parameters and optimiser state kept where the rules put them.
    The context split runs the load-balanced order and the gathered-K/V attention, so equality checks both."""
    tokens, lengths = batch(np.random.default_rng(3), 1, 8, 32)
    single, m1 = train_step(init_state(model.params, FP32), model, tokens, lengths, FP32)
    mesh = make_mesh(**MESHES[axes], devices=jax.devices()[: np.prod(list(MESHES[axes].values()))])
    shardings = param_shardings(CONFIG, mesh)
    state = init_state(jax.device_put(model.params, shardings), FP32)
    data = logical_sharding(tokens.shape, (None, "batch", "seq"), mesh)
    state, m8 = train_step(
        state, model, jax.device_put(tokens, data), jax.device_put(lengths, NamedSharding(mesh, P(*data.spec[:2]))),
        FP32, mesh,
    )  # fmt: skip
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state.params, single.params)
    for name, spec in (("wq", P(None, "tensor", None, "fsdp")), ("w_down", P(None, "fsdp", "tensor"))):
        want = P(*(a if a in mesh.shape and mesh.shape[a] > 1 else None for a in spec))
        assert state.params["layers"][name].sharding.is_equivalent_to(NamedSharding(mesh, want), 4), name
    adam = state.opt_state[1][0]  # (clip, adamw (scale_by_adam, ...)): its moments follow the params
    assert adam.mu["layers"]["wq"].sharding.is_equivalent_to(state.params["layers"]["wq"].sharding, 4)


def test_load_balanced_order_gives_every_shard_equal_causal_work():
    order = load_balanced_order(32, 4)
    assert sorted(order) == list(range(32))
    np.testing.assert_array_equal(order[:8], [0, 1, 2, 3, 28, 29, 30, 31])
    work = [sum(p + 1 for p in shard) for shard in order.reshape(4, 8)]  # keys each shard's queries see
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="does not split into 2 x 4 equal chunks"):
        load_balanced_order(36, 4)


@pytest.mark.parametrize("window", [None, 5])
def test_positional_attention_equals_float64_attention_in_any_order(window):
    """Queries and keys shuffled, GQA, a padded row, blocks that do not divide the lengths: the blocked online
    softmax equals float64 attention by position, and so do its gradients (against the XLA reference)."""
    rng = np.random.default_rng(5)
    b, t, h, kh, d = 2, 23, 4, 2, 8
    q, k, v = (rng.normal(size=s) for s in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))
    lengths = np.array([23, 17])
    pos = np.stack([rng.permutation(t) for _ in range(b)])
    scores = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, h // kh, axis=2)) * d**-0.5
    see = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] < lengths[:, None, None])
    if window is not None:
        see &= pos[:, :, None] - pos[:, None, :] < window
    probs = np.where(see[:, None], np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)  # a row that sees no key gives zeros
    want = np.einsum("bhqk,bkhd->bqhd", probs, np.repeat(v, h // kh, axis=2))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(pos, jnp.int32)] * 2
    valid = jnp.asarray(pos < lengths[:, None])
    got = positional_attention(*args, valid, d**-0.5, window, q_chunk=4, k_chunk=5)
    np.testing.assert_allclose(got, want, atol=2e-5)

    # gradients against the slot-ordered XLA reference on the unshuffled sequence
    inv = np.argsort(pos, axis=1)
    natural = [jnp.asarray(np.take_along_axis(x, inv[..., None, None], 1), jnp.float32) for x in (q, k, v)]
    mask = jnp.asarray(attention_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), t, jnp.asarray(lengths), window))
    ref = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(xla_attention(q, k, v, mask, d**-0.5))), (0, 1, 2))(*natural)
    ordered = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = ordered < jnp.asarray(lengths)[:, None]

    def loss(q, k, v):
        return jnp.sum(jnp.sin(positional_attention(q, k, v, ordered, ordered, valid, d**-0.5, window, 4, 5)))

    grads = jax.grad(loss, (0, 1, 2))(*natural)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, atol=1e-5)


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
