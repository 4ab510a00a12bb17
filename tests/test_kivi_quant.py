"""KIVI quantisation math: bit packing, codes against an independent float64 numpy reference (keys per-channel
over token groups, values per-token over channel groups), the round-to-nearest error bound, constant groups,
the real memory footprint, jittability, and the shape/bits errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.pallas.kivi_quant import (
    QuantizedTensor,
    dequantize,
    nbytes,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)

EPS = {jnp.float16: 2.0**-10, jnp.bfloat16: 2.0**-7, jnp.float32: 2.0**-23}  # one ulp, relative


def kv_data(seed, shape, dtype=jnp.float32):
    """Normal data with per-channel scales and offsets spanning two decades, like keys' outlier channels."""
    rng = np.random.default_rng(seed)
    chan_scale = 10.0 ** rng.uniform(-1, 1, shape[-1])
    chan_shift = rng.uniform(-3, 3, shape[-1])
    x = rng.standard_normal(shape) * chan_scale + chan_shift
    return jnp.asarray(x, dtype)


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def reference(x, axis, group, bits):
    """float64 (lo, scale, real-valued code) per element of x `[b, t, h, d]`, grouped by `group` consecutive
    tokens (axis="token") or channels (axis="channel"); lo and scale are broadcast back to x's shape."""
    x = f64(x)
    b, t, h, d = x.shape
    if axis == "token":
        g = x.reshape(b, t // group, group, h, d)
        lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    else:
        g = x.reshape(b, t, h, d // group, group)
        lo, hi = g.min(axis=4, keepdims=True), g.max(axis=4, keepdims=True)
    lo, hi = np.broadcast_to(lo, g.shape).reshape(x.shape), np.broadcast_to(hi, g.shape).reshape(x.shape)
    scale = (hi - lo) / (2**bits - 1)
    q = np.where(scale > 0, (x - lo) / np.where(scale > 0, scale, 1.0), 0.0)
    return lo, scale, q


def expand(param, axis, group, shape):
    """A stored scale/zero `[b, t/G, h, d]` or `[b, t, h, d/C]` repeated out to `[b, t, h, d]`."""
    return np.repeat(f64(param), group, axis=1 if axis == "token" else 3).reshape(shape)


def quantize(axis, x, group, bits, **kw):
    return (quantize_keys if axis == "token" else quantize_values)(x, group, bits, **kw)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [128, 36])
def test_pack_unpack_round_trip(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 2**bits, (3, 5, n), dtype=np.uint8)
    packed = pack_codes(jnp.asarray(codes), bits)
    per_byte = 8 // bits
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, n // per_byte)
    # The byte layout, independently: byte j holds code j + i * (n / per_byte) at bit offset i * bits.
    planes = codes.astype(np.int64).reshape(3, 5, per_byte, n // per_byte)
    np.testing.assert_array_equal(np.asarray(packed), (planes << (np.arange(per_byte) * bits)[:, None]).sum(-2))
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, n)), codes)


def test_pack_known_byte():
    assert np.asarray(pack_codes(jnp.array([1, 2, 3, 0, 2, 1, 0, 3]), 2)).tolist() == [
        1 | 3 << 2 | 2 << 4,
        2 | 1 << 4 | 3 << 6,
    ]
    assert int(pack_codes(jnp.array([9, 6]), 4)[0]) == 9 | 6 << 4


@pytest.mark.parametrize("axis,group", [("token", 32), ("channel", 32), ("channel", 64)])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.float16])
def test_codes_match_numpy(axis, group, bits, scale_dtype):
    x = kv_data(bits + group, (2, 64, 3, 64))
    qt = quantize(axis, x, group, bits, scale_dtype=scale_dtype)
    lo, scale, q = reference(x, axis, group, bits)
    codes = np.asarray(unpack_codes(qt.packed, bits, x.shape[-1]))
    assert codes.max() <= 2**bits - 1
    # Storing zero/scale in scale_dtype (zero rounded down, scale up) moves the real-valued code by at most
    # ~ 2 ulp(lo) / scale + levels * ulp(scale) / scale; compare codes only where that cannot flip rounding.
    eps, levels = EPS[scale_dtype], 2**bits - 1
    margin = 3 * eps * np.abs(lo) / np.where(scale > 0, scale, 1.0) + 1.5 * levels * eps + 1e-4
    frac = q - np.floor(q)
    sure = np.abs(frac - 0.5) > margin
    assert sure.mean() > 0.75, sure.mean()  # most codes are still checked (float32 storage: > 99%)
    np.testing.assert_array_equal(codes[sure], np.round(q)[sure])
    # The stored parameters are the reference ones, up to the storage rounding.
    np.testing.assert_allclose(expand(qt.zero, axis, group, x.shape), lo, rtol=2 * eps, atol=1e-30)
    np.testing.assert_allclose(
        expand(qt.scale, axis, group, x.shape), scale, rtol=2 * eps, atol=(2 * eps * np.abs(lo) / levels).max()
    )


@pytest.mark.parametrize("axis,group", [("token", 16), ("channel", 32)])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_round_trip_error_bound(axis, group, bits, dtype, scale_dtype):
    x = kv_data(bits, (2, 32, 2, 64), dtype)
    qt = quantize(axis, x, group, bits, scale_dtype=scale_dtype)
    assert qt.scale.dtype == scale_dtype and qt.zero.dtype == scale_dtype
    xs, s = f64(x), expand(qt.scale, axis, group, x.shape)
    _, s_ref, _ = reference(x, axis, group, bits)
    assert np.all(s >= s_ref * (1 - 1e-6))  # the bound below is not vacuous: s is the reference scale,
    assert np.all(s <= s_ref * (1 + 2 * EPS[scale_dtype]) + 2 * EPS[scale_dtype] * np.abs(xs).max())  # rounded
    # In float32 the stored grid covers every element, so round-to-nearest is within half a stored step.
    err = np.abs(f64(dequantize(qt, jnp.float32)) - xs)
    assert np.all(err <= s / 2 * (1 + 1e-6) + 1e-6 * np.abs(xs)), (err - s / 2).max()
    # In the input dtype (default), plus that dtype's own rounding of the result.
    out = dequantize(qt)
    assert out.dtype == dtype and out.shape == x.shape
    err = np.abs(f64(out) - xs)
    assert np.all(err <= s / 2 * (1 + 1e-6) + EPS[dtype] * (np.abs(xs) + s)), (err - s / 2).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.bfloat16])
def test_constant_groups_are_exact(dtype, scale_dtype):
    consts = np.arange(-8, 8, 0.25)  # exactly representable in every dtype involved
    k = np.array(kv_data(0, (1, 64, 2, 64)))
    k[:, :32] = consts  # first token group constant per channel: scale 0 per (head, channel)
    qk = quantize_keys(jnp.asarray(k, dtype), 32, 2, scale_dtype=scale_dtype)
    out = f64(dequantize(qk, jnp.float32))
    assert np.isfinite(out).all() and (np.asarray(qk.scale)[:, 0] == 0).all()
    np.testing.assert_array_equal(out[:, :32], np.broadcast_to(consts, (1, 32, 2, 64)))
    v = np.array(kv_data(1, (1, 64, 2, 64)))
    v[:, 5, 1] = 3.5  # one (token, head) constant across all channels
    v[:, 7] = 0.0  # one token zero in every head
    qv = quantize_values(jnp.asarray(v, dtype), 32, 2, scale_dtype=scale_dtype)
    out = f64(dequantize(qv, jnp.float32))
    assert np.isfinite(out).all() and (np.asarray(qv.scale)[:, 5, 1] == 0).all()
    np.testing.assert_array_equal(out[:, 5, 1], 3.5)
    np.testing.assert_array_equal(out[:, 7], 0.0)
    zeros = quantize_values(jnp.zeros((1, 4, 2, 64), dtype), 64, 4, scale_dtype=scale_dtype)
    np.testing.assert_array_equal(np.asarray(dequantize(zeros), np.float32), 0.0)


def test_nbytes_is_real_saving():
    b, t, h, d, group = 1, 4096, 8, 128, 32
    bf16_bytes = b * t * h * d * 2
    k = jax.random.normal(jax.random.key(0), (b, t, h, d), jnp.bfloat16)
    # 2-bit codes (4 per byte) + a float16 scale and zero per (token group, head, channel) / (token, head,
    # channel group).
    expected = b * t * h * d // 4 + 2 * 2 * (b * (t // group) * h * d)
    assert expected == 1_572_864 and expected <= 0.2 * bf16_bytes  # 0.1875x
    qk = quantize_keys(k, group, 2)
    assert nbytes(qk) == expected == sum(a.nbytes for a in jax.tree_util.tree_leaves(qk))
    assert nbytes(quantize_values(k, group, 2)) == expected  # b*t*h*(d/32) value groups: the same count here
    assert nbytes(jax.eval_shape(lambda x: quantize_keys(x, group, 2), k)) == expected
    assert nbytes(quantize_keys(k, group, 4)) == b * t * h * d // 2 + 2 * 2 * (b * (t // group) * h * d)


def test_jit_and_pytree():
    x = kv_data(3, (1, 64, 2, 32), jnp.bfloat16)
    qk = jax.jit(quantize_keys, static_argnums=(1, 2))(x, 32, 2)
    assert isinstance(qk, QuantizedTensor) and len(jax.tree_util.tree_leaves(qk)) == 3
    eager = quantize_keys(x, 32, 2)
    for a, e in zip(jax.tree_util.tree_leaves(qk), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(dequantize)(qk), np.float32), np.asarray(dequantize(eager), np.float32)
    )
    qv = jax.jit(quantize_values, static_argnums=(1, 2))(x, 16, 4)
    assert qv.axis == "channel" and qv.scale.shape == (1, 64, 2, 2) and qk.scale.shape == (1, 2, 2, 32)
    assert jax.jit(dequantize, static_argnums=1)(qv, jnp.float32).dtype == jnp.float32


def test_errors():
    x = jnp.zeros((1, 100, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"tokens=100 .* group size 32"):
        quantize_keys(x, 32, 2)
    with pytest.raises(ValueError, match=r"head_dim=128 .* group size 48"):
        quantize_values(x, 48, 2)
    for bad in (1, 3, 8):
        with pytest.raises(ValueError, match=f"bits={bad}"):
            quantize_keys(x[:, :96], 32, bad)
        with pytest.raises(ValueError, match=f"bits={bad}"):
            quantize_values(x, 32, bad)
        with pytest.raises(ValueError, match=f"bits={bad}"):
            pack_codes(jnp.zeros((4,), jnp.uint8), bad)
    with pytest.raises(ValueError, match="n=9"):
        unpack_codes(jnp.zeros((2,), jnp.uint8), 2, 9)
    with pytest.raises(ValueError, match="whole bytes"):
        pack_codes(jnp.zeros((6,), jnp.uint8), 2)
