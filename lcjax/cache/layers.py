"""Per-layer state of a cache, stacked `[layers, batch, ...]` (a traced layer index inside the layer scan) or a
tuple of `[batch, ...]` arrays (a Python int layer): these helpers serve both, for every cache class."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PerLayer = jax.Array | tuple[jax.Array, ...]


def layered(num_layers: int, shape: tuple[int, ...], dtype, stacked: bool, fill=0) -> PerLayer:
    """Per-layer state of `shape` filled with `fill`: one `[layers, *shape]` array, or `num_layers` arrays."""
    if stacked:
        return jnp.full((num_layers,) + shape, fill, dtype)
    return tuple(jnp.full(shape, fill, dtype) for _ in range(num_layers))


def scatter_layer(x: PerLayer, layer: jax.Array | int, index: tuple, values: jax.Array) -> PerLayer:
    """`x[layer][index] = values` (out-of-range indices dropped), in place for a stacked array."""
    if isinstance(x, tuple):
        return x[:layer] + (x[layer].at[index].set(values.astype(x[layer].dtype), mode="drop"),) + x[layer + 1 :]
    return x.at[(layer,) + tuple(index)].set(values.astype(x.dtype), mode="drop")


def set_layer(x: PerLayer, layer: jax.Array | int, value: jax.Array) -> PerLayer:
    """x with `x[layer]` replaced by `value: [batch, ...]`."""
    if isinstance(x, tuple):
        return x[:layer] + (value.astype(x[layer].dtype),) + x[layer + 1 :]
    return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), layer, 0)


def repeat_batch(x: PerLayer, n: int) -> PerLayer:
    """Each sequence of per-layer state repeated n times along the batch axis."""
    if isinstance(x, tuple):
        return tuple(jnp.repeat(a, n, axis=0) for a in x)
    return jnp.repeat(x, n, axis=1)


def pad_slots(x: PerLayer, extra: int, fill=0) -> PerLayer:
    """Per-layer state `[(layers,) batch, slots, ...]` with `extra` more slots of `fill` (a copy)."""

    def pad(a, axis):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, extra)
        return jnp.pad(a, widths, constant_values=fill)

    if isinstance(x, tuple):
        return tuple(pad(a, 1) for a in x)
    return pad(x, 2)
