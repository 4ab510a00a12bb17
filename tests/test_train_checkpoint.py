"""Checkpoints: a run stopped after its saved step and resumed from it continues the same loss curve; a
damaged or empty checkpoint directory is named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import ModelConfig
from lcjax.models.transformer import Transformer
from lcjax.train import TrainConfig, init_state, train_step
from lcjax.train.checkpoint import CheckpointError, Checkpoints
from lcjax.train.data import Batches

CONFIG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
TRAIN = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=6, compute_dtype="float32", remat=None)


def run(model, batches, state, steps, checkpoints=None):
    losses = []
    for step in range(int(state.step), steps):
        tokens = jnp.asarray(batches.at(step))
        lengths = jnp.full(tokens.shape[:2], tokens.shape[2], jnp.int32)
        state, metrics = train_step(state, model, tokens, lengths, TRAIN)
        losses.append(float(metrics["loss"]))
        if checkpoints is not None:
            checkpoints.save(step + 1, state, {"data_step": step + 1})
    return state, losses


def test_a_resumed_run_continues_the_same_loss_curve(tmp_path):
    model = Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32, std=0.2)
    rows = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (12, 16)).astype(np.int32)
    batches = Batches(rows, batch=2, seed=1)
    _, straight = run(model, batches, init_state(model.params, TRAIN), 6)

    with Checkpoints(tmp_path / "run", every=3) as checkpoints:  # killed after step 4: the last save is step 3
        run(model, batches, init_state(model.params, TRAIN), 4, checkpoints)
    with Checkpoints(tmp_path / "run", every=3) as checkpoints:
        assert checkpoints.latest_step() == 3
        state, record = checkpoints.restore(like=init_state(model.params, TRAIN))
    assert int(state.step) == 3 and record == {"data_step": 3}
    _, resumed = run(model, batches, state, 6)
    np.testing.assert_allclose(resumed, straight[3:], rtol=1e-6)


def test_an_empty_or_damaged_directory_is_named(tmp_path):
    model = Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32)
    like = init_state(model.params, TRAIN)
    with Checkpoints(tmp_path / "empty") as checkpoints:
        with pytest.raises(CheckpointError, match="holds no checkpoint to resume from"):
            checkpoints.restore(like)
    with Checkpoints(tmp_path / "run", every=1) as checkpoints:
        checkpoints.save(1, like, {"data_step": 1})
    for path in (tmp_path / "run").rglob("*"):  # damage every stored array
        if path.is_file() and "state" in path.parts and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)
    with Checkpoints(tmp_path / "run", every=1) as checkpoints:
        with pytest.raises(CheckpointError, match=r"run: step 1 cannot be restored .*damaged"):
            checkpoints.restore(dataclasses.replace(like))
