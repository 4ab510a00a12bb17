"""Sharding by logical axis names through one rules table.

Every parameter (and every activation the training step constrains) names its axes logically ("embed",
"q_heads", "seq", ...); `LOGICAL_AXIS_RULES` maps each name to mesh axes. Loading, inference and training all
derive their `NamedSharding`s from this table, so changing the parallelism layout is a one-line change here or a
`rules=` argument, never an edit to the model.

The mesh has four axes (`MESH_AXES`), any of them of size 1:
- "data": data parallelism, replicated parameters;
- "fsdp": data parallelism over the batch with parameters (and optimiser state) split along "embed", gathered
  layer by layer for the compute (ZeRO-3);
- "tensor": heads, MLP and vocabulary split across devices (Megatron-style tensor parallelism);
- "context": activations split along the sequence (context parallelism; attention gathers keys and values).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical axis -> mesh axis or axes (None = replicated)
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": "context",
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
}


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int | None = None,
    context: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `MESH_AXES` mesh over `devices` (all by default); `tensor` defaults to what the others leave.

    Devices are laid out with "context" and "tensor" innermost, the axes whose collectives run every layer, so
    on a multi-GPU host they are the NVLink neighbours."""
    devices = list(devices if devices is not None else jax.devices())
    others = data * fsdp * context
    if tensor is None:
        tensor = max(len(devices) // others, 1)
    sizes = dict(data=data, fsdp=fsdp, tensor=tensor, context=context)
    if min(sizes.values()) < 1 or others * tensor != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh {shape} does not cover the {len(devices)} devices given.")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor, context), MESH_AXES)


def _mesh_axes(rule: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dims are named `axes`.

    Mesh axes of size 1 are left out. A dim whose size the mesh axes do not divide (8 KV heads on 16 devices,
    a batch of 1 over 2 "data" devices) is replicated rather than failing, and a mesh axis is used at most once
    per array.
    """
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but {len(axes)} axis names {tuple(axes)}.")
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, axes):
        wanted = _mesh_axes(rules.get(name)) if name is not None else ()
        chosen = tuple(a for a in wanted if mesh.shape.get(a, 1) > 1 and a not in used)
        if not chosen or size % int(np.prod([mesh.shape[a] for a in chosen])):
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def logical_sharding(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(shape, axes, mesh, rules))


def axis_size(mesh: Mesh | None, logical: str, rules=LOGICAL_AXIS_RULES) -> int:
    """How many ways `mesh` splits the logical axis `logical` (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in _mesh_axes(rules.get(logical))]))
