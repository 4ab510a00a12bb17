"""One training step: the decoder inference runs, differentiated; optax AdamW with warmup and decay, gradient
clipping, accumulation over micro-batches by a scan, mixed precision (compute in bf16, parameters and optimizer
state in fp32) and rematerialisation by policy name.

The step is a pure function of a `TrainState` pytree, jitted once; its parallelism comes from the shardings of
its inputs (parameters placed by the logical-axis rules of `lcjax.sharding`, the batch split over "data"), so one
job runs on one GPU or many with no distribution code of its own.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from lcjax.models.transformer import REMAT_POLICIES, Transformer, forward
from lcjax.train.loss import causal_lm_loss

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and step settings.

    learning_rate: the peak, reached after `warmup_steps` of linear warmup, then decayed ("cosine" or "linear")
    to `learning_rate * final_lr_ratio` at `total_steps`. clip_norm: global gradient-norm clip (None: off).
    micro_batches: a step's batch is split into this many, their gradients summed by a scan (the memory of one).
    remat: a `REMAT_POLICIES` name (None: keep every activation). loss_chunk: positions whose logits exist at once.
    compute_dtype: the dtype the forward and backward passes run in; parameters and optimiser state stay fp32.
    """

    learning_rate: float = 2e-5
    warmup_steps: int = 20
    total_steps: int = 1000
    decay: Literal["cosine", "linear"] = "cosine"
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    micro_batches: int = 1
    remat: str | None = "nothing_saveable"
    loss_chunk: int = 1024
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}.")
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is unknown; choose one of {', '.join(REMAT_POLICIES)} or None.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")
        if self.micro_batches < 1 or self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need micro_batches >= 1, total_steps >= 1 and 0 <= warmup_steps <= total_steps; got "
                f"{self.micro_batches}, {self.total_steps}, {self.warmup_steps}."
            )

    def schedule(self) -> optax.Schedule:
        """The learning rate at each step."""
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        end = self.learning_rate * self.final_lr_ratio
        if self.decay == "cosine":
            decay = optax.cosine_decay_schedule(self.learning_rate, decay_steps, alpha=self.final_lr_ratio)
        else:
            decay = optax.linear_schedule(self.learning_rate, end, decay_steps)
        warmup = optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)
        return optax.join_schedules([warmup, decay], [self.warmup_steps])

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW on the schedule, after clipping the global gradient norm."""
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        return adamw if self.clip_norm is None else optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a step reads and writes: step int32 `[]`, fp32 params, the optimiser state."""

    step: jax.Array
    params: dict
    opt_state: Any


def init_state(params: dict, config: TrainConfig) -> TrainState:
    """A fresh state: fp32 copies of `params` (sharded as they are; copies, since a step donates its state) and
    the optimiser's zeros."""
    params = jax.tree.map(lambda x: jnp.astype(x, jnp.float32, copy=True), params)
    return TrainState(jnp.int32(0), params, config.optimizer().init(params))


def loss_and_count(params: dict, model: Transformer, tokens: jax.Array, lengths: jax.Array, config: TrainConfig):
    """(summed cross entropy, predicted tokens) of `tokens: int [batch, seq]` under `params` (cast to the compute
    dtype) with `model`'s config and transforms."""
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    zeros = jnp.zeros_like(lengths)
    hidden, _ = forward(
        p, model.config, tokens, positions, zeros, lengths, None, "prefill", model.attention, model.positions,
        remat=config.remat,
    )  # fmt: skip
    head = p["embed"] if model.config.tie_word_embeddings else p["lm_head"]
    return causal_lm_loss(hidden, head, tokens, lengths, config.loss_chunk)


@partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def train_step(state: TrainState, model: Transformer, tokens: jax.Array, lengths: jax.Array, config: TrainConfig):
    """One optimiser step over `tokens: int [micro_batches, batch, seq]` (right-padded to `lengths: [micro_batches,
    batch]`); `model` supplies config and transforms (its own params are not read). Returns the new state and
    fp32 metrics: the batch's mean loss, the gradient norm before clipping, the learning rate used, tokens."""
    grad_fn = jax.value_and_grad(lambda p, t, n: loss_and_count(p, model, t, n, config), has_aux=True)

    def micro(carry, xs):
        grads, total, count = carry
        (loss_sum, n), g = grad_fn(state.params, *xs)
        return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

    zero = jax.tree.map(jnp.zeros_like, state.params)
    (grads, total, count), _ = jax.lax.scan(micro, (zero, jnp.float32(0), jnp.float32(0)), (tokens, lengths))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # the mean over every predicted token of the step
    updates, opt_state = config.optimizer().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        loss=total / count,
        grad_norm=optax.tree.norm(grads),
        learning_rate=config.schedule()(state.step),
        tokens=count,
    )
    return TrainState(state.step + 1, params, opt_state), metrics
