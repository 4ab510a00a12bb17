"""Sharding by logical axis names through one rules table.

Every parameter (and activation we constrain) names its axes logically ("embed", "q_heads", "mlp", ...);
`LOGICAL_AXIS_RULES` maps each name to a mesh axis. Loading, inference and training all derive their
`NamedSharding`s from this table, so changing the parallelism layout is a one-line change here or a
`rules=` argument, never an edit to the model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (None = replicated). "data" shards batch, "model" is tensor parallelism.
LOGICAL_AXIS_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "layers": None,
    "seq": None,
}


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (all by default); `model` defaults to what is left."""
    devices = list(devices if devices is not None else jax.devices())
    model = model or len(devices) // data
    if data * model != len(devices):
        raise ValueError(f"mesh {data} x {model} does not cover the {len(devices)} devices given.")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_to_spec(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dims are named `axes`.

    A dim whose size the mesh axis does not divide (e.g. 8 KV heads on 16 devices) is replicated
    rather than failing, and a mesh axis is used at most once per array.
    """
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but {len(axes)} axis names {tuple(axes)}.")
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, axes):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(shape, axes, mesh, rules))
