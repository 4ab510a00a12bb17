"""KIVI's asymmetric low-bit KV-cache quantisation as pure, jittable functions (no cache plumbing).

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") observes that keys
have a few outlier *channels* while values have no channel structure, so it quantises keys per-channel
(min/max over each group of G consecutive tokens, separately for every (kv_head, channel)) and values
per-token (min/max over each group of C consecutive channels of one (token, kv_head)). Both use asymmetric
round-to-nearest: zero = min, scale = (max - min) / (2^bits - 1), code = round((x - zero) / scale) in
[0, 2^bits - 1], x ~= code * scale + zero. Codes are packed into uint8 (four 2-bit or two 4-bit codes per
byte, along head_dim) so the memory saving is real. Tokens that do not fill a key group are the caller's
full-precision residual; `quantize_keys` refuses them rather than padding.

Scales and zeros are stored in float16 by default (see `quantize_keys`); codes are computed against the
*stored* values, with the zero rounded down and the scale rounded up, so every element stays within the
quantisation grid and |dequantize(q) - x| <= stored_scale / 2 (plus float32 arithmetic and the output
dtype's own rounding) holds exactly, whatever the storage dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

BITS = (2, 4)
TOKEN, CHANNEL = "token", "channel"  # the axis a QuantizedTensor's groups run along (keys, values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A KIVI-quantised `[batch, tokens, kv_heads, head_dim]` tensor.

    packed: uint8 `[batch, tokens, kv_heads, head_dim * bits / 8]` codes, `8 // bits` per byte in planes
      (see `pack_codes`).
    scale, zero: `[batch, tokens / group, kv_heads, head_dim]` for axis="token" (keys, per-channel) or
      `[batch, tokens, kv_heads, head_dim / group]` for axis="channel" (values, per-token); x ~= code *
      scale + zero.
    bits: 2 or 4. group: tokens per group (axis="token") or channels per group (axis="channel").
    shape, dtype: the original tensor's shape and dtype name (`dequantize`'s default output dtype).
    """

    packed: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    axis: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits}; KIVI quantisation supports bits in {BITS}.")


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Pack integer codes in [0, 2^bits) along the last axis, planar: `[..., n]` -> uint8 `[..., n * bits / 8]`.

    With `p = 8 // bits` codes per byte and `m = n / p` bytes, byte j holds codes j, j + m, ..., j + (p-1) m at
    bit offsets 0, bits, 2 bits, ... So plane i (`(byte >> i * bits) & mask`) is the contiguous run of codes
    `[i m, (i+1) m)`: a kernel unpacks a row with shifts and static slices, no interleaving. n must be a
    multiple of p (head dims are).
    """
    _check_bits(bits)
    per_byte = 8 // bits
    n = codes.shape[-1]
    if n % per_byte:
        raise ValueError(f"pack_codes: {n} codes do not fill whole bytes of {per_byte} {bits}-bit codes.")
    planes = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], per_byte, n // per_byte)
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
    # The shifted codes occupy disjoint bits, so their sum is their bitwise OR and never carries.
    return jnp.sum(planes << shifts, axis=-2, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of `pack_codes`: uint8 `[..., n * bits / 8]` -> uint8 codes `[..., n]`."""
    _check_bits(bits)
    per_byte = 8 // bits
    if packed.shape[-1] * per_byte != n:
        raise ValueError(f"{packed.shape[-1]} packed bytes cannot hold exactly n={n} {bits}-bit codes.")
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
    planes = (packed.astype(jnp.uint8)[..., None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
    return planes.reshape(*packed.shape[:-1], n)


def _quantize(
    x: jax.Array, reduce_axis: int, bits: int, scale_dtype: DTypeLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric quantisation of grouped float32 `x` over `reduce_axis`; returns (codes, scale, zero) with
    scale/zero reduced over that axis and stored in `scale_dtype`."""
    levels = (1 << bits) - 1
    lo = jnp.min(x, axis=reduce_axis, keepdims=True)
    hi = jnp.max(x, axis=reduce_axis, keepdims=True)
    # Round the zero down and the scale up to the storage dtype, so [zero, zero + levels * scale] still
    # covers [lo, hi] and the round-to-nearest error bound holds against the values dequantize will read.
    zero = lo.astype(scale_dtype)
    zero = jnp.where(zero.astype(jnp.float32) > lo, jnp.nextafter(zero, jnp.array(-jnp.inf, scale_dtype)), zero)
    zero32 = zero.astype(jnp.float32)
    need = (hi - zero32) / levels
    scale = need.astype(scale_dtype)
    scale = jnp.where(scale.astype(jnp.float32) < need, jnp.nextafter(scale, jnp.array(jnp.inf, scale_dtype)), scale)
    scale32 = scale.astype(jnp.float32)
    # scale == 0 only when the whole group equals the stored zero: code 0 reproduces it exactly, no 0/0.
    q = (x - zero32) / jnp.where(scale32 == 0, 1.0, scale32)
    codes = jnp.clip(jnp.round(q), 0, levels).astype(jnp.uint8)
    return codes, jnp.squeeze(scale, reduce_axis), jnp.squeeze(zero, reduce_axis)


def quantize_keys(k: jax.Array, group: int, bits: int, scale_dtype: DTypeLike = jnp.float16) -> QuantizedTensor:
    """KIVI key quantisation, per-channel: k `[batch, tokens, kv_heads, head_dim]`; each run of `group`
    consecutive tokens gets its own scale/zero per (kv_head, channel), `[batch, tokens / group, kv_heads,
    head_dim]`. tokens must be a multiple of `group` (the remainder is the caller's full-precision residual).

    scale_dtype: float16 by default, as KIVI's release stores them: 2 bytes like bfloat16 (float32 would take
    a 2-bit, group-32 cache from 0.19x to 0.25x of bf16) but 11 significant bits instead of 8, which matters
    for the zero, whose rounding error is relative to |min| rather than to the (often much smaller) scale.
    Its range ends at 65504: pass bfloat16 or float32 for inputs with larger magnitudes.
    """
    _check_bits(bits)
    batch, tokens, heads, dim = k.shape
    if group <= 0 or tokens % group:
        raise ValueError(
            f"quantize_keys: tokens={tokens} is not a multiple of the key group size {group}; "
            f"keep the last {tokens % group if group > 0 else tokens} tokens in full precision."
        )
    x = k.astype(jnp.float32).reshape(batch, tokens // group, group, heads, dim)
    codes, scale, zero = _quantize(x, 2, bits, scale_dtype)
    packed = pack_codes(codes.reshape(k.shape), bits)
    return QuantizedTensor(packed, scale, zero, bits, group, TOKEN, tuple(k.shape), jnp.dtype(k.dtype).name)


def quantize_values(v: jax.Array, group: int, bits: int, scale_dtype: DTypeLike = jnp.float16) -> QuantizedTensor:
    """KIVI value quantisation, per-token: v `[batch, tokens, kv_heads, head_dim]`; each run of `group`
    consecutive channels of one (token, kv_head) gets its own scale/zero, `[batch, tokens, kv_heads,
    head_dim / group]`. head_dim must be a multiple of `group`. scale_dtype as in `quantize_keys`."""
    _check_bits(bits)
    batch, tokens, heads, dim = v.shape
    if group <= 0 or dim % group:
        raise ValueError(f"quantize_values: head_dim={dim} is not a multiple of the value group size {group}.")
    x = v.astype(jnp.float32).reshape(batch, tokens, heads, dim // group, group)
    codes, scale, zero = _quantize(x, 4, bits, scale_dtype)
    packed = pack_codes(codes.reshape(v.shape), bits)
    return QuantizedTensor(packed, scale, zero, bits, group, CHANNEL, tuple(v.shape), jnp.dtype(v.dtype).name)


def dequantize(qt: QuantizedTensor, dtype: DTypeLike | None = None) -> jax.Array:
    """`[batch, tokens, kv_heads, head_dim]` code * scale + zero in `dtype` (default: the original dtype),
    broadcasting scale/zero along whichever axis `qt` was grouped over."""
    batch, tokens, heads, dim = qt.shape
    codes = unpack_codes(qt.packed, qt.bits, dim).astype(jnp.float32)
    scale, zero = qt.scale.astype(jnp.float32), qt.zero.astype(jnp.float32)
    if qt.axis == TOKEN:
        codes = codes.reshape(batch, tokens // qt.group, qt.group, heads, dim)
        scale, zero = scale[:, :, None], zero[:, :, None]
    elif qt.axis == CHANNEL:
        codes = codes.reshape(batch, tokens, heads, dim // qt.group, qt.group)
        scale, zero = scale[..., None], zero[..., None]
    else:
        raise ValueError(f"QuantizedTensor.axis={qt.axis!r}; expected {TOKEN!r} or {CHANNEL!r}.")
    out = (codes * scale + zero).reshape(qt.shape)
    return out.astype(qt.dtype if dtype is None else dtype)


def nbytes(qt: QuantizedTensor) -> int:
    """Bytes `qt` occupies: packed codes plus scales and zeros (works on arrays and on `jax.eval_shape`
    results alike)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (qt.packed, qt.scale, qt.zero))
