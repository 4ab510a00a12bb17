"""A Flax NNX face for the decoder: the same parameter declarations and the same forward function, as a module.

`Decoder` holds the arrays `lcjax.models.params.param_specs` declares as `nnx.Param`s, each with its logical axes
as sharding metadata, and its `__call__` is `lcjax.models.transformer.forward` + `lm_logits`, the code inference and
`lcjax.train` run. So a Flax user can `nnx.jit` it, train it with `nnx.Optimizer`, or add LoRA adapters
(`Decoder.add_lora`, trained with `wrt=nnx.LoRAParam`); `Decoder.from_model` and `to_model` convert to and from
`Transformer` without copying the weights. The trainer keeps the functional API (docs/models.md, "Flax NNX").
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lcjax import positions as positions_lib
from lcjax.cache import CacheTransform
from lcjax.config import ModelConfig
from lcjax.models.attention import AttentionFn, DenseAttention
from lcjax.models.inputs import token_batch
from lcjax.models.params import ParamSpec, init_params, param_specs, stack_layers, unfuse_mlp
from lcjax.models.transformer import Transformer, check_remat, forward, lm_logits
from lcjax.sharding import LOGICAL_AXIS_RULES, logical_to_spec

# How many trailing dims of each per-layer matrix are its input features: the matrices keep transformers'
# [out, in] orientation (`lcjax.models.params`), and `wo` reads heads x head_dim.
LORA_INPUT_DIMS: Mapping[str, int] = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}

_is_spec = lambda x: isinstance(x, ParamSpec)
_is_variable = lambda x: isinstance(x, nnx.Variable)


def _annotated(
    kind: type[nnx.Variable], value: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None, rules: tuple
) -> nnx.Variable:
    """`kind(value)` carrying its logical axes. With a mesh, `out_sharding` is the spec lcjax's rules give this
    shape on that mesh (`logical_to_spec`: size-1 and non-dividing mesh axes dropped) and the value is placed
    there; without one, it is the logical names with the rules beside them, Flax's convention, which
    `nnx.get_partition_spec` maps name by name (it cannot know which dims a mesh will divide)."""
    if mesh is None:
        sharding = dict(out_sharding=axes, sharding_rules=rules)
    else:
        spec = logical_to_spec(value.shape, axes, mesh, dict(rules))
        value = jax.device_put(value, NamedSharding(mesh, spec))
        sharding = dict(out_sharding=tuple(spec), mesh=mesh)
    # eager_sharding off: values are placed here (or by `init_params`), not by Flax at creation
    return kind(value, eager_sharding=False, logical_axes=axes, **sharding)


def _values(tree):
    """The arrays of a (nested dict) tree of variables."""
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_variable)


def _mesh_of(params: dict) -> Mesh | None:
    sharding = getattr(params["embed"], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """`params` with each adapted layer matrix `W: [layers, *out, *in]` replaced by `W + scale * B @ A`, in W's
    dtype; `lora` maps a name in `params["layers"]` to `(a: [layers, rank, *in], b: [layers, *out, rank])`."""
    layers = dict(params["layers"])
    for name, (a, b) in lora.items():
        w = layers[name]
        num, rank = a.shape[:2]
        delta = jnp.matmul(b.reshape(num, -1, rank), a.reshape(num, rank, -1), preferred_element_type=jnp.float32)
        layers[name] = w + (scale * delta).reshape(w.shape).astype(w.dtype)
    return dict(params, layers=layers)


@partial(jax.jit, static_argnames=("config", "attention", "positions", "remat", "compute_dtype", "scale"))
def _logits(
    params: dict,
    lora: dict,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    config: ModelConfig,
    attention: AttentionFn,
    positions: positions_lib.PositionTransform,
    remat: str | None,
    compute_dtype: np.dtype | None,
    scale: float,
) -> jax.Array:
    """What `Transformer.__call__` computes (`forward` without a cache, then `lm_logits`), after merging the LoRA
    factors and casting to the compute dtype as `lcjax.train.loss_and_count` does."""
    params = merge_lora(params, lora, scale) if lora else params
    if compute_dtype is not None:
        params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    q_positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    zeros = jnp.zeros_like(lengths)
    hidden, _ = forward(
        params, config, tokens, q_positions, zeros, lengths, None, "prefill", attention, positions, remat=remat
    )
    return lm_logits(params, config, hidden)


class Decoder(nnx.Module):
    """The lcjax decoder as an `nnx.Module`: `nnx.Param`s from `param_specs(config)`, layers stacked on a leading
    axis, and the functional forward as `__call__`.

    Make one with random weights, `Decoder(config, rngs=nnx.Rngs(0), dtype=jnp.float32)` (the initialisers of
    `init_params`: normal(0, std) matrices, unit norms, zero biases), or around loaded ones,
    `Decoder.from_model(lcjax.load_model(...)[0])`; `to_model()` gives the `Transformer` back for prefill, decode
    and export.

    Attributes: `params` (a nested dict of `nnx.Param`, the structure of `param_specs`), `lora` (`add_lora`'s
    `nnx.LoRAParam` factors, empty until then), and static `config`, `attention`, `positions`, `cache_transform`,
    `stop_tokens` (kept for `to_model`), `mesh`, `rules`, `remat` (a `REMAT_POLICIES` name or None),
    `compute_dtype` (the dtype the forward runs in; None: the params' own) and `lora_scale`.

    Each Param's metadata carries `logical_axes` (its `ParamSpec.axes`) and `out_sharding`: with a `mesh`, the
    `PartitionSpec` entries `lcjax.sharding.logical_to_spec` gives on it (so `nnx.get_partition_spec` and
    `nnx.get_named_sharding` agree with `load_model` and the trainer), without one the logical names plus
    `sharding_rules`, Flax's logical-axis convention.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        std: float = 0.02,
        params: dict | None = None,
        mesh: Mesh | None = None,
        rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
        attention: AttentionFn = DenseAttention(),
        positions: positions_lib.PositionTransform | None = None,
        cache_transform: CacheTransform | None = None,
        stop_tokens: tuple[int, ...] = (),
        remat: str | None = None,
        compute_dtype=None,
    ):
        """config: the model's shape. rngs: draws the random weights (its `params` stream), in `dtype` with
        matrices normal(0, std). params: arrays to wrap instead (stacked layers, MLP unfused, the structure of
        `param_specs(config)`; `from_model` converts other layouts). mesh, rules: where the params live, by
        `lcjax.sharding`'s logical rules (default: the mesh `params` already sit on, if any).
        attention, positions, cache_transform, stop_tokens: as `Transformer`'s. remat, compute_dtype: see above."""
        check_remat(remat)
        specs = param_specs(config)
        if params is None:
            if rngs is None:
                raise ValueError("Decoder needs rngs= (e.g. nnx.Rngs(0)) to draw weights, or params= to wrap.")
            params = init_params(config, rngs.params(), dtype, std=std, mesh=mesh, rules=rules)
        else:
            mesh = _mesh_of(params) if mesh is None else mesh
            _check_params(params, specs)
        self.config = config
        self.attention = attention
        self.positions = positions_lib.from_config(config) if positions is None else positions
        self.cache_transform = cache_transform
        self.stop_tokens = tuple(stop_tokens)
        self.mesh = mesh
        self.rules = tuple(rules.items())  # hashable: NNX keys its jit cache on static attributes
        self.remat = remat
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.lora_scale = 0.0
        self.params = nnx.data(
            jax.tree.map(
                lambda spec, x: _annotated(nnx.Param, x, spec.axes, mesh, self.rules), specs, params, is_leaf=_is_spec
            )
        )
        self.lora = nnx.data({})

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        *,
        mesh: Mesh | None = None,
        rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
        remat: str | None = None,
        compute_dtype=None,
    ) -> "Decoder":
        """A Decoder around `model`'s weights and transforms. Stacked, unfused weights are wrapped as they are;
        unstacked layers (`load_model`'s default on a GPU) are stacked and a fused MLP unfused first, which
        copies them. mesh: default the one the weights sit on."""
        params = unfuse_mlp(stack_layers(model.params))
        return cls(
            model.config,
            params=params,
            mesh=mesh,
            rules=rules,
            attention=model.attention,
            positions=model.positions,
            cache_transform=model.cache_transform,
            stop_tokens=model.stop_tokens,
            remat=remat,
            compute_dtype=compute_dtype,
        )

    def to_model(self, merge: bool = True) -> Transformer:
        """The `Transformer` with these weights and transforms (stacked layers, the params' dtype). merge: fold
        the LoRA adapters into the weights (`W + scale * B @ A`, new arrays for those matrices), so the model
        computes what this Decoder does; False leaves them out (the base model)."""
        params = _values(self.params)
        if merge and self.lora:
            params = merge_lora(params, self._lora_values(), self.lora_scale)
        return Transformer(params, self.config, self.attention, self.positions, self.cache_transform, self.stop_tokens)

    def add_lora(
        self,
        rank: int,
        targets: Sequence[str] = ("wq", "wv"),
        *,
        alpha: float | None = None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ) -> None:
        """Adds low-rank adapters to the named per-layer matrices (`LORA_INPUT_DIMS` lists them): for `W: [layers,
        *out, *in]`, `lora[name]["a"]: [layers, rank, *in]` (uniform in +-1/sqrt(in), as PEFT's kaiming init)
        and `lora[name]["b"]: [layers, *out, rank]` (zeros, so the logits are unchanged until trained), both
        `nnx.LoRAParam` in `dtype`, sharded by the logical axes of W's dims. The forward then reads
        `W + (alpha / rank) * B @ A` (alpha: default rank, a scale of 1). Train only them with
        `nnx.Optimizer(decoder, tx, wrt=nnx.LoRAParam)` and `nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`
        (a `LoRAParam` is also an `nnx.Param`)."""
        if self.lora:
            raise ValueError(
                "this Decoder has LoRA adapters already; to_model() merges them, from_model() starts again."
            )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}.")
        unknown = [t for t in targets if t not in LORA_INPUT_DIMS]
        if unknown or not targets:
            raise ValueError(
                f"LoRA targets {unknown or list(targets)} unknown; choose from {', '.join(LORA_INPUT_DIMS)}."
            )
        specs = param_specs(self.config)["layers"]
        factors = {}  # name -> (a's shape and axes, b's shape and axes)
        for name in targets:
            shape, axes = specs[name].shape, specs[name].axes
            split = len(shape) - LORA_INPUT_DIMS[name]
            factors[name] = (
                ((shape[0], rank, *shape[split:]), ("layers", None, *axes[split:])),
                ((*shape[:split], rank), (*axes[:split], None)),
            )

        def draw(key):
            keys = dict(zip(factors, jax.random.split(key, len(factors))))
            out = {}
            for name, ((a_shape, _), (b_shape, _)) in factors.items():
                bound = 1.0 / math.sqrt(math.prod(a_shape[2:]))
                a = jax.random.uniform(keys[name], a_shape, jnp.float32, -bound, bound)
                out[name] = (a.astype(dtype), jnp.zeros(b_shape, dtype))
            return out

        drawn = jax.jit(draw)(rngs.params())  # one compiled program rather than one per op
        lora = {
            name: {
                "a": _annotated(nnx.LoRAParam, drawn[name][0], a_axes, self.mesh, self.rules),
                "b": _annotated(nnx.LoRAParam, drawn[name][1], b_axes, self.mesh, self.rules),
            }
            for name, ((_, a_axes), (_, b_axes)) in factors.items()
        }
        self.lora = nnx.data(lora)
        self.lora_scale = float(rank if alpha is None else alpha) / rank

    def __call__(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """float32 logits `[batch, seq, vocab]` of `tokens: int [batch, seq]` (right-padded to `lengths: int
        [batch]`; default every row full), without a cache: `Transformer.__call__`'s computation, with the LoRA
        adapters merged and `remat` and `compute_dtype` applied. Ids are checked on the host when not traced."""
        tokens, lengths = token_batch(tokens, lengths, self.config.vocab_size)
        return _logits(
            _values(self.params),
            self._lora_values(),
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(lengths, jnp.int32),
            config=self.config,
            attention=self.attention,
            positions=self.positions,
            remat=self.remat,
            compute_dtype=self.compute_dtype,
            scale=self.lora_scale,
        )

    def _lora_values(self) -> dict:
        return {name: (f["a"].get_value(), f["b"].get_value()) for name, f in self.lora.items()}


def _check_params(params: dict, specs: dict) -> None:
    """Raises ValueError naming the first parameter whose presence or shape differs from `specs`."""
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0])
    name = lambda path: jax.tree_util.keystr(path)
    missing, extra = sorted(want.keys() - got.keys(), key=name), sorted(got.keys() - want.keys(), key=name)
    hint = "wrap params made for this config (stacked layers, unfused MLP; Decoder.from_model converts a model's)"
    if missing:
        raise ValueError(f"params lack {name(missing[0])} {want[missing[0]].shape}, which the config declares; {hint}.")
    if extra:
        raise ValueError(f"params have {name(extra[0])}, which the config does not declare; {hint}.")
    for path, spec in want.items():
        if tuple(got[path].shape) != spec.shape:
            raise ValueError(f"params{name(path)} has shape {tuple(got[path].shape)}, the config {spec.shape}; {hint}.")
