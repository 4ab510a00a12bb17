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
from lcjax.models.params import ParamSpec, checkpoint_shape, checkpoint_targets, expected_slots, get_path, param_specs
from lcjax.sharding import LOGICAL_AXIS_RULES, logical_sharding


@jax.jit
def _set_layer_copy(buf, x, i):
    return buf.at[i].set(x)


_set_layer_donate = jax.jit(lambda buf, x, i: buf.at[i].set(x), donate_argnums=0)


def _set_layer(buf, x, i):
    # CPU buffers cannot be donated (XLA would warn and copy anyway).
    fn = _set_layer_copy if jax.default_backend() == "cpu" else _set_layer_donate
    return fn(buf, x, jnp.int32(i))


def assemble_params(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray, Path | str]],
                    dtype=jnp.bfloat16, mesh=None, rules=LOGICAL_AXIS_RULES, stacked: bool = True) -> dict:
    """Builds the params pytree from `(transformers name, array, source file)` triples; `stacked=False` gives
    `layers` as a tuple of per-layer dicts (`lcjax.models.params.unstack_layers`'s layout) directly.

    Raises `CheckpointError` naming the file and tensor for an unexpected name, a wrong shape, a tensor
    given twice, or (at the end) any parameter the checkpoint never provided.
    """
    specs = param_specs(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    out: dict = {"layers": {}}
    per_layer_arrays: dict[str, dict[int, jax.Array]] = {}     # unstacked: key -> layer -> array
    filled: dict[tuple[tuple[str, ...], int | None], str] = {}

    def sharding_of(spec: ParamSpec, per_layer: bool):
        if mesh is None:
            return None
        shape, axes = (spec.shape[1:], spec.axes[1:]) if per_layer else (spec.shape, spec.axes)
        return logical_sharding(shape, axes, mesh, rules)

    for name, array, source in tensors:
        targets = checkpoint_targets(config, name)
        if targets is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {config.family} model with "
                                  f"{config.num_layers} layers; is this the right config.json?")
        expected = checkpoint_shape(config, name)
        if expected is not None and tuple(array.shape) != expected:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but the config "
                                  f"implies {expected}.")
        for target in targets:
            slot = (target.path, target.layer)
            if slot in filled:
                raise CheckpointError(f"{source}: tensor {name!r} fills {'.'.join(target.path)} layer "
                                      f"{target.layer}, already filled from {filled[slot]}.")
            filled[slot] = f"{source}:{name}"
            spec = get_path(specs, target.path)
            host = np.ascontiguousarray(target.convert(np.asarray(array)).astype(np_dtype))
            per_layer = target.layer is not None
            want = spec.shape[1:] if per_layer else spec.shape
            if host.shape != want:
                raise CheckpointError(f"{source}: tensor {name!r} converts to {host.shape} for "
                                      f"{'.'.join(target.path)}, expected {want}.")
            device = jax.device_put(host, sharding_of(spec, per_layer))
            if not per_layer:
                out[target.path[0]] = device
                continue
            key = target.path[1]
            if not stacked:
                per_layer_arrays.setdefault(key, {})[target.layer] = device
                continue
            if key not in out["layers"]:
                out["layers"][key] = jnp.zeros(spec.shape, dtype, device=sharding_of(spec, False))
            out["layers"][key] = _set_layer(out["layers"][key], device, target.layer)

    missing = [(path, layer) for path, layer in expected_slots(config) if (path, layer) not in filled]
    if missing:
        shown = ", ".join(f"{'.'.join(p)}" + ("" if l is None else f"[layer {l}]") for p, l in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} parameter(s): {shown}{more}.")
    if not stacked:
        out["layers"] = tuple({key: arrays[layer] for key, arrays in per_layer_arrays.items()}
                              for layer in range(config.num_layers))
    return out
