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
from jax.sharding import Mesh

from lcjax.models.attention import DenseAttention
from lcjax.models.context_parallel import ContextParallelAttention, load_balanced_order
from lcjax.models.params import fused_projections
from lcjax.models.transformer import Transformer, check_remat, forward
from lcjax.sharding import axis_size, logical_sharding
from lcjax.train.loss import next_token_targets, token_loss

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and step settings.

    learning_rate: the peak, reached after `warmup_steps` of linear warmup, then decayed ("cosine" or "linear")
    to `learning_rate * final_lr_ratio` at `total_steps`. clip_norm: global gradient-norm clip (None: off).
    micro_batches: a step's batch is split into this many, their gradients summed by a scan (the memory of one).
    remat: a `REMAT_POLICIES` name (None: keep every activation). loss_chunk: positions whose logits exist at once.
    compute_dtype: the dtype the forward and backward passes run in; parameters and optimiser state stay fp32.
    fuse_projections: run each layer's q, k, v and its gate, up projections as one product each
    (`fused_projections`; the parameters stay separate).
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
    fuse_projections: bool = False

    def __post_init__(self):
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}.")
        check_remat(self.remat)
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


def loss_and_count(
    params: dict,
    model: Transformer,
    tokens: jax.Array,
    lengths: jax.Array,
    config: TrainConfig,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(summed cross entropy, predicted tokens) of `tokens: int [batch, seq]` under `params` (cast to the compute
    dtype) with `model`'s config and transforms.

    mesh: where the step runs. Each layer's activations are pinned to the batch and sequence splits of the
    logical rules; when the "context" axis splits the sequence, the tokens are laid out by
    `load_balanced_order` and attention becomes `ContextParallelAttention` (dense attention only).
    """
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    # the embedding stays fp32: its rows are gathered, then cast, so its gradient is an fp32 scatter-add (repeated
    # tokens summed exactly) and no bf16 copy of the [vocab, d] table is made
    p = {k: v if k == "embed" else jax.tree.map(lambda x: x.astype(dtype), v) for k, v in params.items()}
    if config.fuse_projections:
        p = fused_projections(p)
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
    targets, valid = next_token_targets(tokens, lengths)
    attention, shards, activations = model.attention, 1, None
    if mesh is not None:
        activations = logical_sharding((batch, seq, model.config.hidden_size), ("batch", "seq", None), mesh)
        shards = axis_size(mesh, "seq")
    if shards > 1:
        if not isinstance(model.attention, (DenseAttention, ContextParallelAttention)):
            raise ValueError(
                f"context parallelism runs dense attention; the model's is {type(model.attention).__name__}."
            )
        order = jnp.asarray(load_balanced_order(seq, shards))
        tokens, positions, targets, valid = (x[:, order] for x in (tokens, positions, targets, valid))
        attention = ContextParallelAttention(mesh)
    zeros = jnp.zeros_like(lengths)
    hidden, _ = forward(
        p, model.config, tokens, positions, zeros, lengths, None, "prefill", attention, model.positions,
        remat=config.remat, activation_sharding=activations,
    )  # fmt: skip
    # the fp32 head, cast inside each chunk, so its gradient sums over chunks in fp32
    head = params["embed"] if model.config.tie_word_embeddings else params["lm_head"]
    return token_loss(hidden, head, targets, valid, config.loss_chunk, shards)


@partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("state",))
def train_step(
    state: TrainState,
    model: Transformer,
    tokens: jax.Array,
    lengths: jax.Array,
    config: TrainConfig,
    mesh: Mesh | None = None,
):
    """One optimiser step over `tokens: int [micro_batches, batch, seq]` (right-padded to `lengths: [micro_batches,
    batch]`); `model` supplies config and transforms (its own params are not read). `mesh`: as `loss_and_count`
    (None: as the inputs' shardings place it, no context parallelism). Returns the new state and fp32 metrics:
    the batch's mean loss, the gradient norm before clipping, the learning rate used, tokens."""
    grad_fn = jax.value_and_grad(lambda p, t, n: loss_and_count(p, model, t, n, config, mesh), has_aux=True)

    def micro(carry, xs):
        grads, total, count = carry
        (loss_sum, n), g = grad_fn(state.params, *xs)
        return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

    if tokens.shape[0] == 1:  # no accumulation: a scan of one would add a zeroed fp32 copy of the gradients
        (total, count), grads = grad_fn(state.params, tokens[0], lengths[0])
    else:
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
