"""Position transforms: pure functions from token positions to what attention needs to rotate q and k.

Every transform is a frozen, hashable dataclass (so a model holding one stays a valid `jax.jit` static
argument) whose `__call__(positions) -> Rotary` maps int positions `[batch, seq]` to cos/sin tables.
Angles are computed in float32 whatever the model dtype: bf16 angles lose whole radians at long range.
The numbers follow transformers' `modeling_rope_utils.py`, including its attention factor (YaRN,
LongRoPE), which it folds into cos and sin, and its choice of LongRoPE's long factors whenever the
largest position in the call is at or past `original_max_position_embeddings`.

Build one from a config with `from_config`, or directly, e.g. `longrope(short, long, ...)` with your
own factors; `ROPE_BUILDERS` maps transformers' `rope_type` names to builders.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import ModelConfig, RopeConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rotary:
    """Rotation tables for one call. cos, sin: float32 `[batch, seq, rotary_dim // 2]`.

    The attention factor of YaRN/LongRoPE is already folded in (as transformers does), so it scales
    both q and k.
    """

    cos: jax.Array
    sin: jax.Array

    def apply(self, x: jax.Array) -> jax.Array:
        """Rotates `x: [batch, seq, heads, head_dim]` in rotate-half layout; dims past rotary_dim pass."""
        half = self.cos.shape[-1]
        cos = self.cos[:, :, None, :]
        sin = self.sin[:, :, None, :]
        xf = x.astype(jnp.float32)
        x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
        return out.astype(x.dtype)


class PositionTransform(Protocol):
    def __call__(self, positions: jax.Array) -> Rotary: ...


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim), float32 `[dim // 2]`."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)


def _rotary(positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0) -> Rotary:
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return Rotary(cos=jnp.cos(angles) * attention_factor, sin=jnp.sin(angles) * attention_factor)


@dataclasses.dataclass(frozen=True)
class FixedRope:
    """RoPE with fixed inverse frequencies: default, linear, YaRN and Llama-3.1 scaling are all this."""

    inv_freq: tuple[float, ...]
    attention_factor: float = 1.0

    def __call__(self, positions: jax.Array) -> Rotary:
        return _rotary(positions, jnp.asarray(self.inv_freq, jnp.float32), self.attention_factor)


def _fixed(inv_freq: np.ndarray, attention_factor: float = 1.0) -> FixedRope:
    return FixedRope(tuple(float(x) for x in np.asarray(inv_freq, np.float32)), float(attention_factor))


def rope(dim: int, theta: float = 10000.0) -> FixedRope:
    """Plain RoPE (Su et al. 2021) over the first `dim` dims of each head."""
    return _fixed(base_inv_freq(theta, dim))


def linear(dim: int, theta: float, factor: float) -> FixedRope:
    """Position interpolation (Chen et al. 2023): positions divided by `factor`."""
    return _fixed(base_inv_freq(theta, dim) / np.float32(factor))


def llama3(
    dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> FixedRope:
    """Llama-3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    inv = base_inv_freq(theta, dim).astype(np.float64)
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return _fixed(np.where(medium, smoothed, scaled))


def yarn(
    dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> FixedRope:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, scale attention."""

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1.0 - ramp
    pos_freqs = (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return _fixed(inv, attention_factor)


@dataclasses.dataclass(frozen=True)
class DynamicNTKRope:
    """Dynamic NTK scaling: the base grows with the longest position seen in the call."""

    dim: int
    theta: float
    factor: float
    max_position_embeddings: int

    def __call__(self, positions: jax.Array) -> Rotary:
        seq_len = jnp.maximum(jnp.max(positions) + 1, self.max_position_embeddings).astype(jnp.float32)
        base = self.theta * ((self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        exponents = jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim
        return _rotary(positions, 1.0 / (base**exponents))


def dynamic_ntk(dim: int, theta: float, factor: float, max_position_embeddings: int) -> DynamicNTKRope:
    """Dynamic NTK-aware scaling (as transformers' `dynamic` rope type)."""
    return DynamicNTKRope(dim, float(theta), float(factor), int(max_position_embeddings))


def rescaled_rotary(
    positions: jax.Array, base_inv_freq: jax.Array, factors: jax.Array, n_hat: jax.Array | int, attention_factor
) -> Rotary:
    """LongRoPE's rotation for one factor set: frequency i divided by `factors[i]`, except at the first `n_hat`
    positions, which keep the base frequencies (the paper's n-hat). positions: int `[batch, seq]`;
    base_inv_freq, factors: float32 `[rotary_dim // 2]`; n_hat and attention_factor may be traced (the factor
    search evaluates many genomes in one compiled forward)."""
    pos = positions.astype(jnp.float32)[..., None]
    inv = jnp.where(pos < n_hat, base_inv_freq, base_inv_freq / factors)
    angles = pos * inv
    return Rotary(cos=jnp.cos(angles) * attention_factor, sin=jnp.sin(angles) * attention_factor)


@dataclasses.dataclass(frozen=True)
class LongRope:
    """LongRoPE (Ding et al. 2024): per-dimension rescale factors, short below the original window.

    `short_inv_freq` and `long_inv_freq` are `1 / (factor_i * theta^(2i/dim))`. A call whose largest
    position is at or past `original_max_position_embeddings` uses the long factors for every position.
    `n_hat` > 0 keeps the base frequencies `base_inv_freq` at the first `n_hat` positions (the paper's n-hat;
    transformers has no such field, so only lcjax applies it).

    A conversation that starts short and grows past `original_max_position_embeddings` crosses the switch with a
    cache of keys rotated under the short factors. transformers drops that cache and encodes everything again;
    lcjax rotates the cached keys on to the long factors (`switch_rotation`) in the call that crosses, at the cost
    of one pass over the keys. That makes the first layer's keys exactly those of a fresh prefill under the long
    factors; deeper layers' keys, and all values, were computed from hidden states that attended under the short
    factors, which no rotation undoes, so the result is close to a fresh long prefill, not equal (on a random
    tiny model, 3-10x closer than leaving the keys as they are: tests/test_longrope_switch.py). Re-encode the
    conversation (`prefill`) where exact long-factor states matter.
    """

    short_inv_freq: tuple[float, ...]
    long_inv_freq: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float
    n_hat: int = 0
    base_inv_freq: tuple[float, ...] = ()

    def switch_rotation(self, positions: jax.Array) -> Rotary:
        """The rotation from short-factor to long-factor angles at `positions: int [batch, seq]` (no attention
        factor: it is the same for both): applied to keys cached under the short factors, it gives the keys the
        long factors would have made, since RoPE is a rotation by position x frequency."""
        delta = jnp.asarray(self.long_inv_freq, jnp.float32) - jnp.asarray(self.short_inv_freq, jnp.float32)
        if self.n_hat:  # the first n-hat positions are unscaled under both
            delta = jnp.where(positions[..., None] < self.n_hat, 0.0, delta)
        angles = positions.astype(jnp.float32)[..., None] * delta
        return Rotary(cos=jnp.cos(angles), sin=jnp.sin(angles))

    def __call__(self, positions: jax.Array) -> Rotary:
        use_long = jnp.max(positions) + 1 > self.original_max_position_embeddings
        inv = jnp.where(
            use_long, jnp.asarray(self.long_inv_freq, jnp.float32), jnp.asarray(self.short_inv_freq, jnp.float32)
        )
        if not self.n_hat:
            return _rotary(positions, inv, self.attention_factor)
        base = jnp.asarray(self.base_inv_freq, jnp.float32)
        return rescaled_rotary(positions, base, base / inv, self.n_hat, self.attention_factor)


def longrope(
    dim: int,
    theta: float,
    short_factor,
    long_factor,
    original_max_position_embeddings: int,
    max_position_embeddings: int | None = None,
    attention_factor: float | None = None,
    factor: float | None = None,
    n_hat: int = 0,
) -> LongRope:
    """LongRoPE with your own `short_factor`/`long_factor` (each `dim // 2` values).

    The attention factor defaults to sqrt(1 + ln(s) / ln(original)) with s the extension ratio
    (`factor`, else `max_position_embeddings / original_max_position_embeddings`). `n_hat`: the first positions
    that keep the unscaled frequencies (lcjax only; transformers has no such field).
    """
    short = np.asarray(short_factor, np.float32)
    long = np.asarray(long_factor, np.float32)
    if short.shape != (dim // 2,) or long.shape != (dim // 2,):
        raise ValueError(
            f"longrope needs {dim // 2} short and long factors for rotary dim {dim}; got "
            f"{short.shape[0] if short.ndim else 'scalar'} and {long.shape[0] if long.ndim else 'scalar'}."
        )
    if factor is None:
        factor = (max_position_embeddings or original_max_position_embeddings) / original_max_position_embeddings
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))
        )
    base = (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    return LongRope(
        short_inv_freq=tuple(float(x) for x in 1.0 / (short * base)),
        long_inv_freq=tuple(float(x) for x in 1.0 / (long * base)),
        original_max_position_embeddings=int(original_max_position_embeddings),
        attention_factor=float(attention_factor),
        n_hat=int(n_hat),
        base_inv_freq=tuple(float(x) for x in 1.0 / base) if n_hat else (),
    )


# transformers' rope_type names -> builder(rope config, rotary_dim, max_position_embeddings)
ROPE_BUILDERS: dict[str, Callable[[RopeConfig, int, int], PositionTransform]] = {
    "default": lambda r, dim, n: rope(dim, r.theta),
    "linear": lambda r, dim, n: linear(dim, r.theta, r.factor),
    # the trained context the base grows from (a config that also raised max_position_embeddings records it)
    "dynamic": lambda r, dim, n: dynamic_ntk(dim, r.theta, r.factor, r.original_max_position_embeddings or n),
    "llama3": lambda r, dim, n: llama3(
        dim, r.theta, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings
    ),
    "yarn": lambda r, dim, n: yarn(
        dim,
        r.theta,
        r.factor,
        r.original_max_position_embeddings,
        beta_fast=r.beta_fast or 32.0,
        beta_slow=r.beta_slow or 1.0,
        attention_factor=r.attention_factor,
        mscale=r.mscale,
        mscale_all_dim=r.mscale_all_dim,
        truncate=r.truncate,
    ),
    "longrope": lambda r, dim, n: longrope(
        dim,
        r.theta,
        r.short_factor,
        r.long_factor,
        r.original_max_position_embeddings,
        n,
        r.attention_factor,
        r.factor,
        r.n_hat,
    ),
}


def from_config(config: ModelConfig) -> PositionTransform:
    """The position transform a model config asks for."""
    builder = ROPE_BUILDERS.get(config.rope.rope_type)
    if builder is None:
        raise ValueError(f"Unsupported rope type {config.rope.rope_type!r}; supported: {', '.join(ROPE_BUILDERS)}.")
    return builder(config.rope, config.rotary_dim, config.max_position_embeddings)
