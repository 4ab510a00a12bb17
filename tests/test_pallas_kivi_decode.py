"""KIVI decode attention (the Pallas kernel, interpret mode on CPU and compiled on a GPU; its XLA reference)
against an independent float64 numpy reference that unpacks the planar codes and dequantises itself: bits 2 and
4, head_dim 64 and 128, GQA groups 1/4/8, ragged quantised and residual lengths, first > 0, empty sequences,
poisoned storage outside the valid slots, and the configuration errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import INTERPRET, assert_matches_reference

from lcjax.pallas.kivi_decode_attention import (
    kivi_decode_attention,
    kivi_decode_attention_reference,
    kivi_kernel_supported,
)
from lcjax.pallas.kivi_quant import quantize_keys, quantize_values


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def unpack_np(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 `[..., m]` planar bytes -> codes `[..., m * 8 / bits]`: plane i (bits i*bits..) is channels
    [i m, (i+1) m)."""
    packed = np.asarray(packed)
    return np.concatenate([(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(8 // bits)], axis=-1)


def attention_np(case: dict) -> np.ndarray:
    """float64 `[batch, heads, head_dim]`: dequantise with numpy, append the residual, softmax over the valid
    slots (quantised [first, n_quant), residual [0, n_res)); rows with no valid key are zeros."""
    bits, kg, vg = case["bits"], case["key_group"], case["value_group"]
    keys = unpack_np(case["k_codes"], bits) * np.repeat(f64(case["k_scale"]), kg, axis=1) + np.repeat(
        f64(case["k_zero"]), kg, axis=1
    )
    values = unpack_np(case["v_codes"], bits) * np.repeat(f64(case["v_scale"]), vg, axis=3) + np.repeat(
        f64(case["v_zero"]), vg, axis=3
    )
    q = f64(case["q"])
    batch, heads, _ = q.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    out = np.zeros_like(q)
    for b in range(batch):
        quant = slice(int(case["first"][b]), int(case["n_quant"][b]))
        k = np.concatenate([keys[b, quant], f64(case["res_k"])[b, : int(case["n_res"][b])]], axis=0)
        v = np.concatenate([values[b, quant], f64(case["res_v"])[b, : int(case["n_res"][b])]], axis=0)
        if len(k) == 0:
            continue
        for h in range(heads):
            s = k[:, h // group] @ q[b, h] * case["scale"]
            p = np.exp(s - s.max())
            out[b, h] = p @ v[:, h // group] / p.sum()
    return out


def make_case(
    seed,
    *,
    batch,
    capacity,
    heads,
    kv_heads,
    head_dim,
    res_len,
    bits,
    key_group,
    value_group,
    dtype,
    n_quant,
    n_res,
    first,
) -> dict:
    """Random keys with per-channel scales and offsets (KIVI's outlier channels), quantised by kivi_quant."""
    rng = np.random.default_rng(seed)
    chan_scale = 10.0 ** rng.uniform(-0.5, 0.5, head_dim)
    kv = lambda t: rng.standard_normal((batch, t, kv_heads, head_dim)) * chan_scale + rng.uniform(-2, 2, head_dim)
    keys = quantize_keys(jnp.asarray(kv(capacity), jnp.float32), key_group, bits)
    values = quantize_values(
        jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), jnp.float32), value_group, bits
    )
    return dict(
        q=jnp.asarray(rng.standard_normal((batch, heads, head_dim)), jnp.float32).astype(dtype),
        k_codes=keys.packed,
        k_scale=keys.scale,
        k_zero=keys.zero,
        v_codes=values.packed,
        v_scale=values.scale,
        v_zero=values.zero,
        n_quant=jnp.asarray(n_quant, jnp.int32),
        res_k=jnp.asarray(kv(res_len), jnp.float32).astype(dtype),
        res_v=jnp.asarray(rng.standard_normal((batch, res_len, kv_heads, head_dim)), jnp.float32).astype(dtype),
        n_res=jnp.asarray(n_res, jnp.int32),
        first=jnp.asarray(first, jnp.int32),
        bits=bits,
        key_group=key_group,
        value_group=value_group,
        scale=head_dim**-0.5,
    )


ARRAYS = ("q", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "n_quant", "res_k", "res_v", "n_res")


def run(fn, case: dict, **kw):
    static = {key: case[key] for key in ("scale", "bits", "key_group", "value_group", "first")}
    return fn(*(case[key] for key in ARRAYS), **static, **kw)


CASES = {  # plane width m = head_dim * bits / 8; value chunks of min(m, value_group) channels
    # bits 2, d 128 (m 32), value_group 64 > m, GQA 4; full cache, only residual, first > 0, empty sequence
    "b2_d128_gqa4": dict(
        batch=4,
        capacity=128,
        heads=8,
        kv_heads=2,
        head_dim=128,
        res_len=32,
        bits=2,
        key_group=32,
        value_group=64,
        dtype=jnp.float32,
        n_quant=[128, 0, 96, 0],
        n_res=[32, 13, 0, 0],
        first=[0, 0, 40, 0],
        kw={},
    ),
    # bits 4, d 64 (m 32 = value_group), GQA 8, bf16 q and residual; first = n_quant - 1 (one quantised key)
    "b4_d64_gqa8_bf16": dict(
        batch=3,
        capacity=96,
        heads=8,
        kv_heads=1,
        head_dim=64,
        res_len=16,
        bits=4,
        key_group=32,
        value_group=32,
        dtype=jnp.bfloat16,
        n_quant=[96, 64, 32],
        n_res=[0, 16, 5],
        first=[0, 33, 31],
        kw=dict(num_splits=2),
    ),
    # bits 2, d 64 (m 16), no GQA, key_group 64 in blocks of 16, first inside a block
    "b2_d64_mha_block16": dict(
        batch=2,
        capacity=256,
        heads=4,
        kv_heads=4,
        head_dim=64,
        res_len=8,
        bits=2,
        key_group=64,
        value_group=32,
        dtype=jnp.float32,
        n_quant=[256, 128],
        n_res=[8, 0],
        first=[17, 0],
        kw=dict(block_k=16, num_splits=5),
    ),
    # bits 4, d 128 (m 64), value_group 32 < m (two chunks per plane), key_group 16, fp16
    "b4_d128_gqa4_f16": dict(
        batch=2,
        capacity=64,
        heads=4,
        kv_heads=1,
        head_dim=128,
        res_len=32,
        bits=4,
        key_group=16,
        value_group=32,
        dtype=jnp.float16,
        n_quant=[64, 0],
        n_res=[32, 0],
        first=[3, 0],
        kw={},
    ),
}


def valid_mask(case: dict) -> np.ndarray:
    """bool `[batch, heads, 1, slots]` over quantised then residual slots (for assert_matches_reference)."""
    batch, heads, _ = case["q"].shape
    capacity, res_len = case["k_codes"].shape[1], case["res_k"].shape[1]
    mask = np.zeros((batch, heads, 1, capacity + res_len), bool)
    for b in range(batch):
        mask[b, :, 0, int(case["first"][b]) : int(case["n_quant"][b])] = True
        mask[b, :, 0, capacity : capacity + int(case["n_res"][b])] = True
    return mask


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_and_reference_match_float64(name):
    spec = dict(CASES[name])
    kw = spec.pop("kw")
    case = make_case(sorted(CASES).index(name), **spec)
    ref = attention_np(case)
    mask = valid_mask(case)
    out = run(kivi_decode_attention, case, interpret=INTERPRET, **kw)
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype
    empty = assert_matches_reference(out[:, None], ref[:, None], mask, spec["dtype"])
    assert empty.any() == (name in ("b2_d128_gqa4", "b4_d128_gqa4_f16"))  # the cases with an empty sequence
    xla = run(kivi_decode_attention_reference, case)
    assert_matches_reference(xla[:, None], ref[:, None], mask, spec["dtype"])
    if spec["dtype"] == jnp.float32:  # same dequantised values and fp32 math: far inside the generic bound
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(xla), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["b2_d64_mha_block16", "b2_d128_gqa4"])  # residual in XLA (8 rows), in the kernel
def test_storage_outside_the_valid_slots_is_never_read_into_the_output(name):
    """Scales and zeros of slots outside [first, n_quant) and residual rows past n_res are NaN (storage that was
    never written): the output must equal the clean run exactly, and be finite."""
    spec = dict(CASES[name])
    spec.pop("kw")
    clean = make_case(7, **spec)
    capacity, kg = spec["capacity"], spec["key_group"]
    slot = np.arange(capacity)[None, :]
    first, n_quant = np.asarray(spec["first"])[:, None], np.asarray(spec["n_quant"])[:, None]
    bad_slot = (slot < first) | (slot >= n_quant)  # [batch, capacity]
    group_lo = np.arange(0, capacity, kg)[None, :]
    bad_group = (group_lo + kg <= first) | (group_lo >= n_quant)  # no valid slot in the group
    bad_res = np.arange(spec["res_len"])[None, :] >= np.asarray(spec["n_res"])[:, None]
    poison = lambda x, bad: jnp.where(jnp.asarray(bad)[:, :, None, None], jnp.nan, x).astype(x.dtype)
    dirty = dict(
        clean,
        k_scale=poison(clean["k_scale"], bad_group),
        k_zero=poison(clean["k_zero"], bad_group),
        v_scale=poison(clean["v_scale"], bad_slot),
        v_zero=poison(clean["v_zero"], bad_slot),
        res_k=poison(clean["res_k"], bad_res),
        res_v=poison(clean["res_v"], bad_res),
    )
    for fn, kw in (
        (kivi_decode_attention, dict(interpret=INTERPRET, block_k=16)),
        (kivi_decode_attention_reference, {}),
    ):
        out = np.asarray(run(fn, dirty, **kw))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out, np.asarray(run(fn, clean, **kw)))


def test_reference_handles_configurations_the_kernel_refuses():
    """value_group 8 on a 16-channel plane (bits 2, head_dim 64) makes 8-wide dots: the kernel names the
    problem, the reference still matches float64."""
    case = make_case(
        3,
        batch=2,
        capacity=64,
        heads=4,
        kv_heads=2,
        head_dim=64,
        res_len=8,
        bits=2,
        key_group=32,
        value_group=8,
        dtype=jnp.float32,
        n_quant=[64, 32],
        n_res=[8, 3],
        first=[0, 5],
    )
    assert not kivi_kernel_supported(64, 2, 32, 8)
    with pytest.raises(ValueError, match="dot minimum"):
        run(kivi_decode_attention, case, interpret=INTERPRET)
    np.testing.assert_allclose(
        np.asarray(run(kivi_decode_attention_reference, case)), attention_np(case), atol=2e-5, rtol=2e-5
    )


def test_supported_configurations():
    assert all(kivi_kernel_supported(d, bits, 32, 32) for d in (64, 128) for bits in (2, 4))
    assert kivi_kernel_supported(128, 2, 128, 64) and kivi_kernel_supported(128, 4, 16, 16)
    assert not kivi_kernel_supported(96, 4, 32, 32)  # head_dim
    assert not kivi_kernel_supported(128, 3, 32, 32)  # bits
    assert not kivi_kernel_supported(128, 2, 48, 32)  # key_group not a power of two
    assert not kivi_kernel_supported(128, 2, 8, 32)  # key blocks under 16 slots
    assert not kivi_kernel_supported(128, 2, 32, 48)  # value_group does not divide head_dim
    assert not kivi_kernel_supported(64, 4, 32, 8)  # 8-channel value chunks


def test_errors_name_the_problem():
    case = make_case(
        5,
        batch=1,
        capacity=64,
        heads=4,
        kv_heads=2,
        head_dim=64,
        res_len=8,
        bits=4,
        key_group=32,
        value_group=32,
        dtype=jnp.float32,
        n_quant=[64],
        n_res=[0],
        first=[0],
    )
    with pytest.raises(ValueError, match="block_k=64"):
        run(kivi_decode_attention, case, interpret=INTERPRET, block_k=64)  # a block would span two key groups
    with pytest.raises(ValueError, match="k_scale"):
        run(kivi_decode_attention, dict(case, k_scale=case["k_scale"][:, :1]), interpret=INTERPRET)
    with pytest.raises(ValueError, match="capacity=48 is not a multiple of key_group=32"):
        run(kivi_decode_attention, dict(case, k_codes=case["k_codes"][:, :48]), interpret=INTERPRET)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        run(kivi_decode_attention, dict(case, q=jnp.zeros((1, 3, 64))), interpret=INTERPRET)
    d96 = dict(
        q=jnp.zeros((1, 4, 96)),
        k_codes=jnp.zeros((1, 64, 2, 48), jnp.uint8),
        v_codes=jnp.zeros((1, 64, 2, 48), jnp.uint8),
        k_scale=jnp.zeros((1, 2, 2, 96), jnp.float16),
        k_zero=jnp.zeros((1, 2, 2, 96), jnp.float16),
        v_scale=jnp.zeros((1, 64, 2, 3), jnp.float16),
        v_zero=jnp.zeros((1, 64, 2, 3), jnp.float16),
        res_k=jnp.zeros((1, 8, 2, 96)),
        res_v=jnp.zeros((1, 8, 2, 96)),
    )
    with pytest.raises(ValueError, match="head_dim=96 is not supported"):
        run(kivi_decode_attention, dict(case, **d96), interpret=INTERPRET)
    run(kivi_decode_attention_reference, dict(case, **d96))  # the reference takes it
