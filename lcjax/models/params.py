"""Every parameter declared once: shape, logical axes and initialiser.

`param_specs(config)` is the single source from which random init, abstract shapes (`jax.eval_shape`-free
shape tests), shardings and the checkpoint map (`lcjax.models.checkpoint`) are all derived. Layers are stacked
on a leading "layers" axis so the model scans over them. Matrices keep transformers' `[out, in]` orientation (split
into heads where that helps), so loading never transposes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.config import ModelConfig
from lcjax.sharding import LOGICAL_AXIS_RULES, logical_sharding


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, logical axis names and initialiser ("normal", "ones", "zeros")."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"


def param_specs(config: ModelConfig) -> dict:
    """Nested dict of `ParamSpec` for `config` (the pytree structure of the model's params)."""
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    H, K, Hd = c.num_heads, c.num_kv_heads, c.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "wq": ParamSpec((L, H, Hd, D), ("layers", "q_heads", "head_dim", "embed")),
        "wk": ParamSpec((L, K, Hd, D), ("layers", "kv_heads", "head_dim", "embed")),
        "wv": ParamSpec((L, K, Hd, D), ("layers", "kv_heads", "head_dim", "embed")),
        "wo": ParamSpec((L, D, H, Hd), ("layers", "embed", "q_heads", "head_dim")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "w_gate": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
        "w_up": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
        "w_down": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
    }
    if c.qkv_bias:
        layers["bq"] = ParamSpec((L, H, Hd), ("layers", "q_heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, Hd), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, Hd), ("layers", "kv_heads", "head_dim"), "zeros")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((V, D), ("vocab", "embed"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(config: ModelConfig, dtype=jnp.bfloat16, mesh=None, rules=LOGICAL_AXIS_RULES):
    """`jax.ShapeDtypeStruct` pytree of the params (with shardings when `mesh` is given); allocates nothing."""

    def one(spec: ParamSpec):
        sharding = None if mesh is None else logical_sharding(spec.shape, spec.axes, mesh, rules)
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=sharding)

    return jax.tree.map(one, param_specs(config), is_leaf=_is_spec)


def param_shardings(config: ModelConfig, mesh, rules=LOGICAL_AXIS_RULES):
    """`NamedSharding` pytree of the params on `mesh`."""
    return jax.tree.map(lambda s: logical_sharding(s.shape, s.axes, mesh, rules), param_specs(config), is_leaf=_is_spec)


def init_params(
    config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, std: float = 0.02, mesh=None, rules=LOGICAL_AXIS_RULES
) -> dict:
    """Random params (normal(0, std) matrices, unit norms, zero biases), sharded when `mesh` is given."""
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    arrays = []
    for spec, k in zip(leaves, keys):
        if mesh is None:
            arrays.append(make(spec, k))
        else:
            sharding = logical_sharding(spec.shape, spec.axes, mesh, rules)
            arrays.append(jax.jit(lambda k, spec=spec: make(spec, k), out_shardings=sharding)(k))
    return jax.tree.unflatten(treedef, arrays)


# ---- layer layouts -------------------------------------------------------------------------------------


def unstack_layers(params: dict) -> dict:
    """params with `layers` as a tuple of per-layer dicts (each array without the leading layers axis).

    Why: XLA on GPU reads a layer's weights out of the stacked arrays badly inside a decode step (it copies
    the MLP matrices for cuBLAS and runs the attention projections as slow sliced reductions; BENCHMARKS.md,
    "Decode: whole model"). A copy: free the stacked
    params afterwards. Already unstacked params come back unchanged."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    num = len(jax.tree.leaves(layers)[0])
    return dict(params, layers=tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num)))


def stack_layers(params: dict) -> dict:
    """The inverse of `unstack_layers` (a copy); stacked params come back unchanged."""
    layers = params["layers"]
    if not isinstance(layers, tuple):
        return params
    return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def _stack_keeping_sharding(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """jnp.stack([a, b], axis), laid out on a mesh as a is (a `NamedSharding` gains an unsplit axis), rather
    than as XLA's propagation happens to choose."""
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jnp.stack([a, b], axis=axis)
    spec = list(sharding.spec) + [None] * (a.ndim - len(sharding.spec))
    spec.insert(axis, None)
    out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.jit(lambda x, y: jnp.stack([x, y], axis=axis), out_shardings=out)(a, b)


def fuse_mlp(params: dict) -> dict:
    """params with each layer's `w_gate` and `w_up` (`[..., F, D]`) replaced by `w_gate_up` `[..., 2, F, D]`
    (gate first): one matrix-vector product per decode step instead of two, faster for Llama-3-8B's shapes on
    an H100 (BENCHMARKS.md, "Decode: matrix-vector products"). A copy of the MLP's two input
    matrices: free the unfused params afterwards. Already fused params come back unchanged. Sharded params
    stay sharded as they were (the new axis of 2 is not split)."""

    def fuse(layer: dict) -> dict:
        if "w_gate_up" in layer:
            return layer
        layer = dict(layer)
        gate, up = layer.pop("w_gate"), layer.pop("w_up")
        return dict(layer, w_gate_up=_stack_keeping_sharding(gate, up, gate.ndim - 2))

    layers = params["layers"]
    return dict(params, layers=tuple(map(fuse, layers)) if isinstance(layers, tuple) else fuse(layers))


def fused_projections(params: dict) -> dict:
    """params (layers stacked or not) with each layer's input projections fused for training: `wq`, `wk`, `wv` as
    `wqkv` `[..., kv_heads, group + 2, head_dim, D]` (each key-value head's `group` query heads, then its key and
    value, so a split of the heads over a mesh keeps each group whole) and `w_gate`, `w_up` as `w_gate_up`. One
    product per layer input instead of five, and one for each of their input gradients. Plain jnp ops for use
    under jit (the forward's XLA propagates the shardings); differentiable back to the separate params."""

    def fuse(layer: dict) -> dict:
        layer = dict(layer)
        if "wq" in layer:
            wq, wk, wv = layer.pop("wq"), layer.pop("wk"), layer.pop("wv")
            *lead, heads, head_dim, dim = wq.shape
            kv = wk.shape[-3]
            groups = wq.reshape(*lead, kv, heads // kv, head_dim, dim)
            layer["wqkv"] = jnp.concatenate([groups, wk[..., None, :, :], wv[..., None, :, :]], axis=-3)
        if "w_gate" in layer:
            layer["w_gate_up"] = jnp.stack([layer.pop("w_gate"), layer.pop("w_up")], axis=-3)
        return layer

    layers = params["layers"]
    return dict(params, layers=tuple(map(fuse, layers)) if isinstance(layers, tuple) else fuse(layers))


def unfuse_mlp(params: dict) -> dict:
    """The inverse of `fuse_mlp` (views of the fused arrays); unfused params come back unchanged."""

    def unfuse(layer: dict) -> dict:
        if "w_gate_up" not in layer:
            return layer
        layer = dict(layer)
        gate_up = layer.pop("w_gate_up")
        axis = gate_up.ndim - 3
        return dict(layer, w_gate=jnp.take(gate_up, 0, axis=axis), w_up=jnp.take(gate_up, 1, axis=axis))

    layers = params["layers"]
    return dict(params, layers=tuple(map(unfuse, layers)) if isinstance(layers, tuple) else unfuse(layers))
