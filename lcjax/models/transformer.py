"""The Llama-family decoder (Llama, Mistral, Qwen2, Phi-3) as a pure function of params and transforms.

Why a function rather than Flax NNX modules: loading streams checkpoint tensors straight into stacked, sharded
arrays; the layer loop is one `lax.scan` over those arrays so compile time does not grow with depth; attention,
positions and the cache are values passed in; and training takes `jax.grad` of the same function. A params
pytree plus a frozen config does all of that with no module state to split and merge, which is how
jax-llm-examples writes its models. `Transformer` bundles params, config and transforms in one
pytree whose static part (config and transforms, all hashable) keys `jax.jit`'s cache. For Flax users,
`lcjax.models.nnx.Decoder` wraps these same parameters and this same function as an NNX module.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lcjax import positions as positions_lib
from lcjax.cache import Cache, CacheTransform, DenseStorage, as_cache_transform, empty_observation, observe_rows
from lcjax.config import ModelConfig
from lcjax.models.attention import AttentionFn, AttentionMeta, DenseAttention, Phase
from lcjax.models.inputs import token_batch, warn_past_context
from lcjax.models.params import fuse_mlp, init_params, stack_layers, unstack_layers


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with fp32 accumulation; `x: [..., dim]` keeps its dtype."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU MLP, `x: [batch, seq, hidden]`; the gate and up weights separate or fused (`fuse_mlp`)."""
    if "w_gate_up" in p:
        gate_up = jnp.einsum("bsd,tfd->bstf", x, p["w_gate_up"])
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    else:
        gate = jnp.einsum("bsd,fd->bsf", x, p["w_gate"])
        up = jnp.einsum("bsd,fd->bsf", x, p["w_up"])
    return jnp.einsum("bsf,df->bsd", jax.nn.silu(gate) * up, p["w_down"])


def _residual_mlp(p: dict, h: jax.Array, eps: float, chunk: int | None) -> jax.Array:
    """`h + mlp(rms_norm(h))` for `h: [batch, seq, hidden]`, over the sequence in chunks of `chunk` tokens (None:
    at once), so a long prompt's MLP intermediates (`[seq, intermediate]`, 44 GiB at 512K for Llama-3-8B)
    never exist whole. The chunks update `h` in place: a `lax.map` would allocate a fresh output per layer,
    and with unstacked layers XLA initialised all 32 of those at once (32 GiB at 128K on an H100)."""
    block = lambda x: x + _mlp(p, rms_norm(x, p["mlp_norm"], eps))
    seq = h.shape[1]
    if chunk is None or seq <= chunk:
        return block(h)
    full = seq // chunk

    def body(i, h):
        start = i * chunk
        return jax.lax.dynamic_update_slice_in_dim(h, block(jax.lax.dynamic_slice_in_dim(h, start, chunk, 1)), start, 1)

    h = jax.lax.fori_loop(0, full, body, h)
    if full * chunk < seq:  # the ragged last chunk, statically
        h = h.at[:, full * chunk :].set(block(h[:, full * chunk :]))
    return h


def _attention_inputs(config: ModelConfig, rotary: positions_lib.Rotary, p: dict, h: jax.Array):
    """Normed, projected and rotated q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`."""
    x = rms_norm(h, p["attn_norm"], config.rms_norm_eps)
    if "wqkv" in p:  # `fused_projections`: [kv_heads, group + 2, head_dim, d]
        qkv = jnp.einsum("bsd,kgjd->bskgj", x, p["wqkv"])
        b, s, kv, _, head_dim = qkv.shape
        q, k, v = qkv[..., :-2, :].reshape(b, s, -1, head_dim), qkv[..., -2, :], qkv[..., -1, :]
    else:
        q = jnp.einsum("bsd,hkd->bshk", x, p["wq"])
        k = jnp.einsum("bsd,hkd->bshk", x, p["wk"])
        v = jnp.einsum("bsd,hkd->bshk", x, p["wv"])
    if config.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    return rotary.apply(q), rotary.apply(k), v


def _after_attention(config: ModelConfig, mlp_chunk: int | None, p: dict, h: jax.Array, attn: jax.Array) -> jax.Array:
    """The output projection and the MLP, both residual: the layer's output `[batch, seq, hidden]`."""
    h = h + jnp.einsum("bshk,dhk->bsd", attn, p["wo"])
    return _residual_mlp(p, h, config.rms_norm_eps, mlp_chunk)


def _layer(
    config: ModelConfig,
    attention: AttentionFn,
    rotary: positions_lib.Rotary,
    meta_base: dict,
    mlp_chunk: int | None,
    activation_sharding: jax.sharding.NamedSharding | None,
    around_attention: bool,
    carry,
    xs,
):
    """One decoder layer. around_attention: recompute the parts before and after attention in the backward pass
    but keep what attention saves for its own (`"save_attention"` in `REMAT_POLICIES`)."""
    h, cache = carry
    p, layer = xs
    if activation_sharding is not None:
        h = jax.lax.with_sharding_constraint(h, activation_sharding)
    before = partial(_attention_inputs, config, rotary)
    after = partial(_after_attention, config, mlp_chunk)
    if around_attention:
        before = jax.checkpoint(before, policy=jax.checkpoint_policies.nothing_saveable)
        after = jax.checkpoint(after, policy=jax.checkpoint_policies.nothing_saveable)
    q, k, v = before(p, h)
    attn, cache = attention(q, k, v, cache, AttentionMeta(layer=layer, **meta_base))
    return (after(p, h, attn), cache), None


# what a layer keeps for the backward pass, by name: jax.checkpoint_policies' names, and "save_attention": the
# layer recomputed except attention, whose inputs, output and softmax statistics are kept (a fused attention's
# forward is not run twice, for the memory of q, k, v and the output)
REMAT_POLICIES = (
    "nothing_saveable",
    "save_attention",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


def check_remat(name: str | None) -> None:
    """Raises ValueError unless `name` is a `REMAT_POLICIES` name or None (keep every activation)."""
    if name is not None and name not in REMAT_POLICIES:
        raise ValueError(f"remat {name!r} is unknown; choose one of {', '.join(REMAT_POLICIES)} or None.")


def remat_policy(name: str):
    """The `jax.checkpoint` policy called `name` (one of `REMAT_POLICIES` but "save_attention", which is not one
    policy over the layer): "nothing_saveable" recomputes each layer in the backward pass,
    "dots_with_no_batch_dims_saveable" keeps the projections' outputs."""
    if name not in REMAT_POLICIES or name == "save_attention":
        raise ValueError(f"remat policy {name!r} is unknown; choose one of {', '.join(REMAT_POLICIES)}.")
    return getattr(jax.checkpoint_policies, name)


def forward(
    params: dict,
    config: ModelConfig,
    tokens: jax.Array,
    q_positions: jax.Array,
    start: jax.Array,
    lengths: jax.Array,
    cache: Cache | None,
    phase: Phase,
    attention: AttentionFn,
    position_transform: positions_lib.PositionTransform,
    mlp_chunk: int | None = None,
    remat: str | None = None,
    activation_sharding: jax.sharding.NamedSharding | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Runs the decoder over `tokens: int [batch, seq]`; returns final hidden states `[batch, seq, hidden]`
    (after the final norm) and the cache with every layer's keys and values written.

    q_positions: int32 `[batch, seq]`; start, lengths: int32 `[batch]` (see `AttentionMeta`); mlp_chunk: run
    the MLP over the sequence in chunks of this many tokens (long prompts), or at once (None); remat: a
    `REMAT_POLICIES` name, what each layer keeps for the backward pass (None: everything, no recomputation);
    activation_sharding: where each layer's input `[batch, seq, hidden]` lives on a mesh (training pins the batch
    and sequence splits so XLA gathers the weights, not the activations; None: XLA's choice).
    """
    # cast to the layers' dtype: training keeps the embedding in fp32 (an exact scatter-add for its gradient)
    h = jnp.take(params["embed"], tokens, axis=0).astype(params["final_norm"].dtype)
    rotary = position_transform(q_positions)
    meta_base = dict(
        q_positions=q_positions,
        start=start,
        lengths=lengths,
        phase=phase,
        sliding_window=config.sliding_window,
        scale=config.head_dim**-0.5,
    )
    around_attention = remat == "save_attention"
    step = partial(_layer, config, attention, rotary, meta_base, mlp_chunk, activation_sharding, around_attention)
    if remat is not None and not around_attention:
        step = jax.checkpoint(step, policy=remat_policy(remat))
    if isinstance(params["layers"], tuple):  # unstacked (`unstack_layers`): one traced copy per layer
        for i, p in enumerate(params["layers"]):
            (h, cache), _ = step((h, cache), (p, i))
            if tokens.shape[1] > 1 and cache is not None:
                # finish each layer's cache write before the next layer: nothing downstream reads it, so XLA
                # otherwise deferred every layer's KIVI quantisation to the end (32 GiB of live K/V at 128K)
                h, cache = jax.lax.optimization_barrier((h, cache))
    else:  # stacked: one scan, compile time independent of depth
        layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
        (h, cache), _ = jax.lax.scan(step, (h, cache), (params["layers"], layer_ids))
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), cache


def cross_position_switch(transform: positions_lib.PositionTransform, cache: Cache, q_positions: jax.Array) -> Cache:
    """Before a call that appends to `cache` at `q_positions: int [batch, seq]`: for a LongRoPE model, the cache
    with its keys re-rotated from the short to the long factors when this call is the one that crosses
    `original_max_position_embeddings` (everything cached so far was written under the short factors, this call's
    tokens get the long ones); otherwise the cache unchanged. See `lcjax.positions.LongRope` for what this makes
    exact and what it cannot."""
    if not isinstance(transform, positions_lib.LongRope) or transform.short_inv_freq == transform.long_inv_freq:
        return cache
    rope = transform
    if not hasattr(cache, "rotate_keys"):
        warnings.warn(
            f"{type(cache).__name__} cannot re-rotate its keys: a turn of this LongRoPE model that crosses "
            f"original_max_position_embeddings ({rope.original_max_position_embeddings}) reads keys cached under "
            "the short factors with queries under the long ones. The dense cache re-rotates them.",
            stacklevel=2,
        )
        return cache
    original = rope.original_max_position_embeddings
    crossing = (jnp.max(cache.positions) <= original) & (jnp.max(q_positions) + 1 > original)

    def rerotate(cache):
        return cache.rotate_keys(lambda keys, slots: rope.switch_rotation(slots).apply(keys))

    return jax.lax.cond(crossing, rerotate, lambda c: c, cache)


def lm_logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., vocab]` from final hidden states `[..., hidden]`."""
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transformer:
    """Params + config + transforms. Make one with `lcjax.load_model` or `Transformer.init`.

    stop_tokens: the ids `lcjax.generate` stops at unless told otherwise (`load_model` sets the tokenizer's
    end-of-sequence and end-of-turn ids, as transformers' generation config does)."""

    params: dict
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    attention: AttentionFn = dataclasses.field(default=DenseAttention(), metadata=dict(static=True))
    positions: positions_lib.PositionTransform | None = dataclasses.field(default=None, metadata=dict(static=True))
    cache_transform: CacheTransform | None = dataclasses.field(default=None, metadata=dict(static=True))
    stop_tokens: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def __post_init__(self):
        if self.positions is None:
            object.__setattr__(self, "positions", positions_lib.from_config(self.config))
        object.__setattr__(self, "cache_transform", as_cache_transform(self.cache_transform))

    @classmethod
    def init(
        cls, config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, std: float = 0.02, mesh=None, **transforms
    ) -> "Transformer":
        """A model with random weights, normal(0, std) (for tests and benchmarks)."""
        return cls(init_params(config, key, dtype, std=std, mesh=mesh), config, **transforms)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def with_transforms(
        self,
        *,
        attention: AttentionFn | None = None,
        positions: positions_lib.PositionTransform | None = None,
        cache_transform=None,
    ) -> "Transformer":
        """The same weights with other attention, position and/or cache transforms.

        cache_transform: what the model's KV cache is and what happens to it after each turn, from
        `lcjax.methods` (a press such as `SnapKVPress(compression_ratio=0.5)`, `KIVI()`, `Quest()`), or a tuple
        of them applied in order (`(SnapKVPress(), Quest())`): it makes the cache, runs at the end of every
        prefill and appended turn (so later turns and decode steps read the compressed cache) and may change
        how decode reads it; "dense" removes one."""
        changes = {k: v for k, v in dict(attention=attention, positions=positions).items() if v is not None}
        if cache_transform is not None:
            changes["cache_transform"] = as_cache_transform(cache_transform)
        return dataclasses.replace(self, **changes)

    def with_layer_layout(self, layout: Literal["stacked", "unstacked"]) -> "Transformer":
        """The same model with its layer weights stacked (one `lax.scan` over layers: compiles in time
        independent of depth; the layout for training and long prefill) or unstacked (a Python loop over
        per-layer arrays: faster decode steps on a GPU, see `lcjax.models.params.unstack_layers`).
        Converting copies the weights; drop the old model to free them."""
        convert = {"stacked": stack_layers, "unstacked": unstack_layers}
        if layout not in convert:
            raise ValueError(f"layout must be 'stacked' or 'unstacked', got {layout!r}.")
        return dataclasses.replace(self, params=convert[layout](self.params))

    def with_fused_mlp(self) -> "Transformer":
        """The same model with each layer's MLP gate and up matrices stacked into one `w_gate_up`, so a decode
        step reads them in one matrix-vector product (BENCHMARKS.md, "Decode: matrix-vector products"). Same
        logits; a copy of those weights; `lcjax.loading.export` writes either form."""
        return dataclasses.replace(self, params=fuse_mlp(self.params))

    @property
    def layer_layout(self) -> str:
        return "unstacked" if isinstance(self.params["layers"], tuple) else "stacked"

    def init_cache(self, batch: int, capacity: int) -> Cache:
        """An empty cache for this model's layer layout, of the kind its cache transform keeps."""
        keeper = self.cache_transform or DenseStorage()  # no transform: the dense cache
        return keeper.init_cache(self.config, batch, capacity, self.dtype, self.layer_layout == "stacked")

    def prefill(
        self,
        tokens,
        lengths=None,
        *,
        capacity: int | None = None,
        logits: Literal["all", "last"] = "all",
        mlp_chunk: int | None = None,
        batch_chunk: int | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Encodes prompts from scratch.

        tokens: int `[batch, seq]` (numpy or jax; right-padded when `lengths: [batch]` is given).
        Returns float32 logits `[batch, seq, vocab]` (or `[batch, vocab]` at each prompt's last token with
        `logits="last"`) and a cache holding the prompts, with room for `capacity` tokens (default seq).
        `capacity=0` keeps no cache and returns None for it (a Llama-3-8B cache at 512K tokens is 68 GiB);
        `mlp_chunk` runs the MLP over the sequence in chunks of that many tokens to bound its memory;
        `batch_chunk` prefills that many sequences at a time, each group's cache written in place into the
        batch's (so the activations of one group, not of the whole batch, bound the memory).
        """
        tokens, lengths = self._checked(tokens, lengths)
        batch, seq = tokens.shape
        capacity = seq if capacity is None else capacity
        if 0 < capacity < seq:
            raise ValueError(f"capacity {capacity} is smaller than the prompt length {seq}.")
        if batch_chunk is None or batch_chunk >= batch or not capacity:
            return _prefill(self, tokens, lengths, capacity, logits, mlp_chunk)
        if batch_chunk < 1:
            raise ValueError(f"batch_chunk must be >= 1, got {batch_chunk}.")
        full = jax.eval_shape(lambda: _prefill(self, tokens, lengths, capacity, logits, mlp_chunk)[1])
        cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), full)
        outs = []
        for start in range(0, batch, batch_chunk):
            rows = slice(start, start + batch_chunk)
            part_logits, part = _prefill(self, tokens[rows], lengths[rows], capacity, logits, mlp_chunk)
            cache = _write_rows(cache, part, start)
            outs.append(part_logits)
        return jnp.concatenate(outs, axis=0), cache

    def extend(
        self, tokens, cache: Cache, lengths=None, *, logits: Literal["all", "last"] = "last"
    ) -> tuple[jax.Array, Cache]:
        """Appends a new turn to `cache`: tokens int `[batch, seq]` (right-padded when `lengths: [batch]`, the
        new tokens per sequence, is given) attend over everything cached before them and are added to it.

        Returns float32 logits (`"last"`: `[batch, vocab]` at each sequence's last new token; `"all"`:
        `[batch, seq, vocab]`) and the extended cache. Raises ValueError when the turn does not fit the
        cache's capacity (`cache.with_capacity` makes room).
        """
        tokens, lengths = self._checked(tokens, lengths, cache)
        seq = tokens.shape[1]
        need = cache.slots_needed(seq)
        if need > cache.capacity:
            raise ValueError(
                f"extend: {seq} new tokens after {int(jnp.max(cache.lengths))} cached need "
                f"{need} slots, but the cache holds {cache.capacity}; grow it with "
                f"cache.with_capacity(n) first."
            )
        return _extend(self, tokens, lengths, cache, logits=logits)

    def __call__(self, tokens, lengths=None) -> jax.Array:
        """float32 logits `[batch, seq, vocab]` without a cache (training and scoring)."""
        return _logits_no_cache(self, *self._checked(tokens, lengths))

    @property
    def scales_context(self) -> bool:
        """Whether the position transform reaches past `config.max_position_embeddings`: dynamic NTK scales with
        the input, and a transform other than the config's own (say LongRoPE with searched factors) is taken to
        be chosen for the context it is used at."""
        return self.positions != positions_lib.from_config(self.config) or isinstance(
            self.positions, positions_lib.DynamicNTKRope
        )

    def _checked(self, tokens, lengths, cache: Cache | None = None) -> tuple[jax.Array, jax.Array]:
        """Token ids and lengths checked on the host (`lcjax.models.inputs`), as int32 device arrays; warns when
        the call reaches past the trained context."""
        tokens, lengths = token_batch(
            tokens, lengths, self.config.vocab_size, batch=None if cache is None else cache.batch
        )
        if isinstance(lengths, np.ndarray):
            start = 0 if cache is None else int(jnp.max(cache.positions))
            # the warning points at the user's call of prefill, extend or the model
            warn_past_context(
                start + int(lengths.max()), self.config.max_position_embeddings, self.scales_context, stacklevel=3
            )
        return jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)


def _positions_for(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


@dataclasses.dataclass(frozen=True)
class _ObserveQueries:
    """Wraps an attention transform so it also records each layer's last `window` queries for the cache
    transform: the model threads `(cache, Observation)` through its layers in place of the cache; the wrapped
    method sees only the cache."""

    attention: AttentionFn
    window: int

    def __call__(self, q, k, v, carry, meta):
        cache, obs = carry
        out, cache = self.attention(q, k, v, cache, meta)
        rows, _, _ = observe_rows(meta.start, meta.lengths, self.window)
        q_obs = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [batch, window, heads, d]
        return out, (cache, dataclasses.replace(obs, q=obs.q.at[meta.layer].set(q_obs.astype(obs.q.dtype))))


def _run_and_press(
    model: Transformer,
    tokens,
    q_positions,
    start,
    lengths,
    cache,
    phase: Phase,
    mlp_chunk: int | None,
    new_capacity: int | None,
):
    """forward, then (when the model has a cache transform) its end-of-turn step on the cache it wrote (a press
    compresses it). lengths: valid slots after the call. new_capacity: the cache's slots afterwards (None: keep
    the capacity)."""
    if phase == "extend":
        cache = cross_position_switch(model.positions, cache, q_positions)
    transform = model.cache_transform
    if cache is None or transform is None:
        hidden, cache = forward(
            model.params,
            model.config,
            tokens,
            q_positions,
            start,
            lengths,
            cache,
            phase,
            model.attention,
            model.positions,
            mlp_chunk,
        )
        return hidden, None if cache is None else cache.advance(lengths - start)
    c = model.config
    attention, carry, obs = model.attention, cache, None
    if transform.window_size:
        obs = empty_observation(
            c.num_layers, tokens.shape[0], transform.window_size, c.num_heads, c.head_dim, model.dtype, start, lengths
        )
        attention, carry = _ObserveQueries(model.attention, transform.window_size), (cache, obs)
    hidden, carry = forward(
        model.params, c, tokens, q_positions, start, lengths, carry, phase, attention, model.positions, mlp_chunk
    )
    cache, obs = carry if transform.window_size else (carry, None)
    cache = cache.advance(lengths - start)
    new_capacity = cache.capacity if new_capacity is None else new_capacity
    return hidden, transform.after_turn(cache, obs, c.head_dim**-0.5, new_capacity)


@partial(jax.jit, static_argnames=("capacity", "logits", "mlp_chunk"))
def _prefill(model: Transformer, tokens, lengths, capacity: int, logits: str, mlp_chunk: int | None = None):
    cache = model.init_cache(tokens.shape[0], capacity) if capacity else None
    zeros = jnp.zeros_like(lengths)
    new_capacity = None
    if model.cache_transform is not None and capacity:  # the transform's bound plus the room asked after the prompt
        new_capacity = min(
            capacity, model.cache_transform.max_budget(model.config.num_layers, capacity) + capacity - tokens.shape[1]
        )
    hidden, cache = _run_and_press(
        model, tokens, _positions_for(tokens), zeros, lengths, cache, "prefill", mlp_chunk, new_capacity
    )
    if logits == "last":
        hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return lm_logits(model.params, model.config, hidden), cache


@partial(jax.jit, donate_argnums=0)
def _write_rows(cache, part, start):
    """`cache` with `part` (the same pytree for fewer sequences) written at batch rows `start ...`, in place: each
    leaf's batch axis is the one axis where the two shapes differ."""

    def put(full, rows):
        axes = [i for i, (a, b) in enumerate(zip(full.shape, rows.shape)) if a != b]
        return full if not axes else jax.lax.dynamic_update_slice_in_dim(full, rows.astype(full.dtype), start, axes[0])

    return jax.tree.map(put, cache, part)


@partial(jax.jit, static_argnames=("logits",))
def _extend(model: Transformer, tokens, lengths, cache: Cache, logits: str):
    start = cache.lengths
    q_positions = cache.positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    hidden, cache = _run_and_press(model, tokens, q_positions, start, start + lengths, cache, "extend", None, None)
    if logits == "last":
        hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return lm_logits(model.params, model.config, hidden), cache


@jax.jit
def _logits_no_cache(model: Transformer, tokens, lengths):
    zeros = jnp.zeros_like(lengths)
    hidden, _ = forward(
        model.params,
        model.config,
        tokens,
        _positions_for(tokens),
        zeros,
        lengths,
        None,
        "prefill",
        model.attention,
        model.positions,
    )
    return lm_logits(model.params, model.config, hidden)
