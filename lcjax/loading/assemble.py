"""Streams checkpoint tensors into the model's sharded parameter arrays, stacked or per layer.

Each tensor is converted on the host (reshape/split, dtype cast) and sent to its devices with the sharding
the logical-axis rules give. Stacked: it is written into its layer slot of a preallocated stacked array by a
jitted update that donates the old buffer, so on GPU the write is in place. Unstacked: it stays the layer's
own array. Either way peak host memory is about one tensor and peak device memory about one model plus one
tensor (loading stacked and then unstacking would hold two models for a moment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import ModelConfig
from lcjax.loading.safetensors import CheckpointError
from lcjax.models.checkpoint import checkpoint_layout, get_path, ignored, to_param
from lcjax.models.params import ParamSpec, param_specs
from lcjax.sharding import LOGICAL_AXIS_RULES, logical_sharding


def _write_layer(buf, x, i):
    return buf.at[i].set(x)


# in place where the buffer can be donated; CPU buffers cannot be (XLA would warn and copy anyway)
_set_layer_copy, _set_layer_donate = jax.jit(_write_layer), jax.jit(_write_layer, donate_argnums=0)


def _set_layer(buf, x, i):
    fn = _set_layer_copy if jax.default_backend() == "cpu" else _set_layer_donate
    return fn(buf, x, jnp.int32(i))


def assemble_params(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray, Path | str]],
    dtype=jnp.bfloat16,
    mesh=None,
    rules=LOGICAL_AXIS_RULES,
    stacked: bool = True,
) -> dict:
    """Builds the params pytree from `(transformers name, array, source file)` triples; `stacked=False` gives
    `layers` as a tuple of per-layer dicts (`lcjax.models.params.unstack_layers`'s layout) directly.

    Raises `CheckpointError` naming the file and tensor for an unexpected name, a wrong shape, a tensor
    given twice, or (at the end) every tensor of `checkpoint_layout` the checkpoint never provided, by its
    checkpoint name.
    """
    specs = param_specs(config)
    layout = checkpoint_layout(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    out: dict = {"layers": {}}
    per_layer_arrays: dict[str, dict[int, jax.Array]] = {}  # unstacked: key -> layer -> array
    seen: dict[str, str | Path] = {}

    def sharding_of(spec: ParamSpec, per_layer: bool):
        if mesh is None:
            return None
        shape, axes = (spec.shape[1:], spec.axes[1:]) if per_layer else (spec.shape, spec.axes)
        return logical_sharding(shape, axes, mesh, rules)

    for name, array, source in tensors:
        if ignored(config, name):
            continue
        tensor = layout.get(name)
        if tensor is None:
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r} for a {config.family} model with "
                f"{config.num_layers} layers; is this the right config.json?"
            )
        if tuple(array.shape) != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config implies {tensor.shape}."
            )
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name!r} appears again (first in {seen[name]}).")
        seen[name] = source
        for part in tensor.parts:
            spec = get_path(specs, part.path)
            per_layer = part.layer is not None
            want = spec.shape[1:] if per_layer else spec.shape
            host = np.ascontiguousarray(to_param(np.asarray(array), part, want).astype(np_dtype))
            device = jax.device_put(host, sharding_of(spec, per_layer))
            if not per_layer:
                out[part.path[0]] = device
                continue
            key = part.path[1]
            if not stacked:
                per_layer_arrays.setdefault(key, {})[part.layer] = device
                continue
            if key not in out["layers"]:
                out["layers"][key] = jnp.zeros(spec.shape, dtype, device=sharding_of(spec, False))
            out["layers"][key] = _set_layer(out["layers"][key], device, part.layer)

    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}.")
    if not stacked:
        out["layers"] = tuple(
            {key: arrays[layer] for key, arrays in per_layer_arrays.items()} for layer in range(config.num_layers)
        )
    return out
