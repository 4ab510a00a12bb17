"""Every parameter declared once: shape, logical axes, initialiser, and where it lives in a checkpoint.

`param_specs(config)` is the single source from which random init, abstract shapes (`jax.eval_shape`-free
shape tests), shardings and the checkpoint-name mapping are all derived. Layers are stacked on a leading
"layers" axis so the model scans over them. Matrices keep transformers' `[out, in]` orientation (split
into heads where that helps), so loading never transposes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

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
    return jax.tree.map(lambda s: logical_sharding(s.shape, s.axes, mesh, rules), param_specs(config),
                        is_leaf=_is_spec)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, std: float = 0.02,
                mesh=None, rules=LOGICAL_AXIS_RULES) -> dict:
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
    the MLP matrices for cuBLAS and runs the attention projections as slow sliced reductions): an 8B decode
    step took 16.5 ms stacked vs 7.1 ms unstacked on an H100 (BENCHMARKS.md). A copy: free the stacked
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
    (gate first): one matrix-vector product per decode step instead of two, 80.4 us against 2 x 42.0 us for
    Llama-3-8B's shapes on an H100 (BENCHMARKS.md, `experiments.bench_gemv`). A copy of the MLP's two input
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


# ---- checkpoint names -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """Where (part of) a checkpoint tensor goes: param `path`, `layer` (None if unstacked), and how to
    turn the checkpoint array (transformers layout) into the param's per-layer shape."""

    path: tuple[str, ...]
    layer: int | None
    convert: Callable[[np.ndarray], np.ndarray]


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def checkpoint_targets(config: ModelConfig, name: str) -> list[Target] | None:
    """The params a transformers tensor `name` fills (several for Phi-3's fused tensors).

    Returns None for a name this model does not use; [] for tensors that are known and deliberately
    ignored (rotary caches, a tied `lm_head.weight`).
    """
    c = config
    H, K, Hd, D, F = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    if name == "model.embed_tokens.weight":
        return [Target(("embed",), None, lambda a: a)]
    if name == "model.norm.weight":
        return [Target(("final_norm",), None, lambda a: a)]
    if name == "lm_head.weight":
        return [] if c.tie_word_embeddings else [Target(("lm_head",), None, lambda a: a)]
    m = _LAYER_RE.match(name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= c.num_layers:
        return None

    def t(param: str, convert=lambda a: a) -> Target:
        return Target(("layers", param), i, convert)

    heads = lambda n: (lambda a: a.reshape(n, Hd, D))
    bias_heads = lambda n: (lambda a: a.reshape(n, Hd))
    simple = {
        "input_layernorm.weight": [t("attn_norm")],
        "post_attention_layernorm.weight": [t("mlp_norm")],
        "self_attn.q_proj.weight": [t("wq", heads(H))],
        "self_attn.k_proj.weight": [t("wk", heads(K))],
        "self_attn.v_proj.weight": [t("wv", heads(K))],
        "self_attn.o_proj.weight": [t("wo", lambda a: a.reshape(D, H, Hd))],
        "mlp.gate_proj.weight": [t("w_gate")],
        "mlp.up_proj.weight": [t("w_up")],
        "mlp.down_proj.weight": [t("w_down")],
        "self_attn.rotary_emb.inv_freq": [],
    }
    if c.qkv_bias:
        simple.update({
            "self_attn.q_proj.bias": [t("bq", bias_heads(H))],
            "self_attn.k_proj.bias": [t("bk", bias_heads(K))],
            "self_attn.v_proj.bias": [t("bv", bias_heads(K))],
        })
    if c.family == "phi3":
        q_end, k_end = H * Hd, (H + K) * Hd
        simple["self_attn.qkv_proj.weight"] = [
            t("wq", lambda a: a[:q_end].reshape(H, Hd, D)),
            t("wk", lambda a: a[q_end:k_end].reshape(K, Hd, D)),
            t("wv", lambda a: a[k_end:].reshape(K, Hd, D)),
        ]
        simple["mlp.gate_up_proj.weight"] = [t("w_gate", lambda a: a[:F]), t("w_up", lambda a: a[F:])]
    return simple.get(rest)


def checkpoint_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The transformers-layout shape expected for tensor `name` (None if unknown)."""
    c = config
    H, K, Hd, D, F, V = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size, c.vocab_size
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (V, D)
    if name == "model.norm.weight":
        return (D,)
    m = _LAYER_RE.match(name)
    if not m or int(m.group(1)) >= c.num_layers:
        return None
    return {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Hd, D), "self_attn.k_proj.weight": (K * Hd, D),
        "self_attn.v_proj.weight": (K * Hd, D), "self_attn.o_proj.weight": (D, H * Hd),
        "self_attn.q_proj.bias": (H * Hd,), "self_attn.k_proj.bias": (K * Hd,), "self_attn.v_proj.bias": (K * Hd,),
        "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
        "self_attn.qkv_proj.weight": ((H + 2 * K) * Hd, D), "mlp.gate_up_proj.weight": (2 * F, D),
        "self_attn.rotary_emb.inv_freq": None,
    }.get(m.group(2))


def expected_slots(config: ModelConfig) -> Iterator[tuple[tuple[str, ...], int | None]]:
    """Every (param path, layer) a complete checkpoint must fill."""
    specs = param_specs(config)
    for key, spec in specs.items():
        if key == "layers":
            for name in spec:
                for i in range(config.num_layers):
                    yield ("layers", name), i
        else:
            yield (key,), None


def get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
