"""Split-K decode attention over a KIVI-quantised KV cache, dequantised in registers (Pallas, Triton-lowered).

Layout of one layer (see `lcjax.pallas.kivi_quant`): keys and values are 2- or 4-bit codes packed into uint8
`[batch, capacity, kv_heads, m]`, m = head_dim * bits / 8 bytes per row, plus fp16 scales and zeros:

- keys per channel: `k_scale, k_zero [batch, capacity / key_group, kv_heads, head_dim]`, one row for each
  run of key_group consecutive slots, key[t, c] = code * k_scale[t // key_group, c] + k_zero[...];
- values per token: `v_scale, v_zero [batch, capacity, kv_heads, head_dim / value_group]`, value[t, c] =
  code * v_scale[t, c // value_group] + v_zero[t, c // value_group].

The packing is planar: with p = 8 // bits codes per byte, byte j of a row holds channels j, j + m, ...,
j + (p-1) m at bit offsets 0, bits, 2 bits, ... So `(bytes >> i * bits) & mask` of a whole `[slots, m]` byte
tile is plane i, the *contiguous* channels [i m, (i+1) m), already in order. The kernel unpacks with shifts, a
mask and static slices only; an interleaved packing (codes 2j, 2j+1 in one byte) would need a reshape or
gather of register values, which Triton does not do well (or at all). Plane-wise the logits are a sum of
small dots, sum_i q[:, i m:(i+1) m] . key_plane_i^T, so q never has to be reassembled either.

The kernel follows `decode_attention`'s flash-decoding scheme: grid (batch, kv_heads, splits) over the
quantised slots, one program attending the GQA group's query heads (zero-padded to 16 rows: Triton's dot
minimum) over its split in blocks of block_k slots (default key_group, so one key-scale row per block), base-2
online softmax, partials (unnormalised acc, max, sum) per split. The full-precision residual (the newest
tokens, R <= a few hundred rows) is one more split's partial: in the kernel when R is a power of two >= 16 (one
Triton tile), else computed in XLA; `merge_splits` combines them all.
Valid quantised slots are [first, n_quant), valid residual rows [0, n_res); a sequence with none gives zeros.

Numerics: the scales are folded into the query and probability side (see `_kernel`), so the dots read the raw
codes; they run in q's dtype for bf16/fp16 queries (like `decode_attention`'s) and in fp32 for fp32 queries
(exact in interpret mode; TF32 inputs on a GPU). Softmax statistics and accumulators are fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lcjax.numerics import masked_softmax
from lcjax.pallas import _common
from lcjax.pallas import _triton_flash as _flash
from lcjax.pallas.decode_attention import MIN_ROWS, _splits, merge_splits, split_partials
from lcjax.pallas.kivi_quant import CHANNEL, TOKEN, QuantizedTensor, dequantize

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_BITS = (2, 4)
MIN_DOT = 16  # Triton's dot wants every dimension >= 16


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _unsupported(head_dim: int, bits: int, key_group: int, value_group: int) -> str | None:
    """Why the kernel cannot run this configuration, or None if it can."""
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim={head_dim} is not supported (supported: {KERNEL_HEAD_DIMS})"
    if bits not in KERNEL_BITS:
        return f"bits={bits} is not supported (supported: {KERNEL_BITS})"
    m = head_dim * bits // 8
    if m < MIN_DOT:
        return f"a plane of {m} channels (head_dim={head_dim}, bits={bits}) is under Triton's dot minimum of 16"
    if not _pow2(key_group) or key_group % MIN_DOT:
        return f"key_group={key_group} must be a power of two and a multiple of 16"
    if value_group <= 0 or head_dim % value_group:
        return f"value_group={value_group} does not divide head_dim={head_dim}"
    if m % value_group and value_group % m:
        return (
            f"value_group={value_group} and the plane width m={m} (head_dim * bits / 8) must divide one "
            f"another, so that a value chunk lies in one plane and one scale group"
        )
    if min(m, value_group) < MIN_DOT:
        return (
            f"value chunks of min(m={m}, value_group={value_group}) = {min(m, value_group)} channels are "
            f"under Triton's dot minimum of 16"
        )
    return None


def kivi_kernel_supported(head_dim: int, bits: int, key_group: int, value_group: int) -> bool:
    """Whether `kivi_decode_attention`'s kernel handles this cache configuration (else use the reference)."""
    return _unsupported(head_dim, bits, key_group, value_group) is None


def _kernel(
    n_quant_ref,
    first_ref,
    q_ref,
    kc_ref,
    ks_ref,
    kz_ref,
    vc_ref,
    vs_ref,
    vz_ref,
    *refs,
    bits: int,
    head_dim: int,
    key_group: int,
    value_group: int,
    block_k: int,
    split_len: int,
    qk_scale: float,
    dot_dtype,
    residual_split: int | None,
):
    """One (batch, kv head, split) program. Refs (block views): q `[rows, d]`; kc, vc uint8 `[capacity, m]`;
    ks, kz fp16 `[capacity / key_group, d]`; vs, vz fp16 `[capacity, d / value_group]`; then, with a
    `residual_split`, n_res `[1]` and the residual rows res_k, res_v `[R, d]`; then the outputs. Writes acc
    `[rows, d]` (unnormalised), m and l `[rows]` (base-2 running max and sum). The program of split
    `residual_split` (past the quantised slots) attends the residual rows [0, n_res) instead, so its partial
    merges with the others' and no separate residual step or concatenation is needed.

    The scales are folded into the 16-row side instead of dequantising the `[block_k, d]` tiles: a block's keys
    share one scale/zero row per channel, so q.k = (q * scale) . code + q . zero, and a value chunk's tokens
    each have one scale/zero, so sum_t p_t v_t = (p * scale) . code + sum_t p_t zero_t. The codes (small exact
    integers) go to the dots as they are; `dot_dtype` is q's dtype for bf16/fp16 queries (as the dense kernel's
    dots), float32 otherwise."""
    per_byte = 8 // bits
    m = head_dim // per_byte  # bytes per row = channels per plane
    c = min(m, value_group)  # channels per value chunk: one plane, one scale group
    mask = (1 << bits) - 1

    split = pl.program_id(2)
    valid_from, valid_to = first_ref[0], n_quant_ref[0]
    start = split * split_len
    # skip the whole blocks before `first`; blocks stay block_k-aligned (start is a multiple of block_k)
    lo = jnp.maximum(start, jax.lax.div(valid_from, block_k) * block_k)
    hi = jnp.minimum(start + split_len, valid_to)
    n_blocks = jax.lax.div(jnp.maximum(hi - lo, 0) + block_k - 1, block_k)
    lane = jnp.arange(block_k, dtype=jnp.int32)

    # q plane i: channels [i m, (i+1) m), matching key plane i (static slices of the ref, no register slicing)
    q_planes = [q_ref[:, pl.ds(i * m, m)].astype(jnp.float32) for i in range(per_byte)]

    def plane(byte_tile: jax.Array, i: int) -> jax.Array:
        """Codes of plane i of a uint8 tile, in dot_dtype (the top plane needs no mask, plane 0 no shift)."""
        x = byte_tile if i == 0 else byte_tile >> (i * bits)
        if i < per_byte - 1:
            x = x & jnp.uint8(mask)
        return x.astype(jnp.float32).astype(dot_dtype)

    def body(n, state):
        accs, m_run, l_run = state
        s0 = pl.multiple_of(lo + n * block_k, block_k)
        slots = pl.ds(s0, block_k)
        key_row = pl.ds(jax.lax.div(s0, key_group), 1)  # block_k divides key_group: one scale row
        k_bytes = kc_ref[slots, :]  # [bk, m] uint8
        logits, bias = None, None
        for i in range(per_byte):
            cols = pl.ds(i * m, m)
            k_scale = ks_ref[key_row, cols].astype(jnp.float32)  # [1, m]
            k_zero = kz_ref[key_row, cols].astype(jnp.float32)
            q_scaled = (q_planes[i] * k_scale).astype(dot_dtype)  # [rows, m]
            part = _flash.dot(q_scaled, plane(k_bytes, i), trans_b=True)  # [rows, bk]
            zero_part = jnp.sum(q_planes[i] * k_zero, axis=1)  # [rows]
            logits = part if logits is None else logits + part
            bias = zero_part if bias is None else bias + zero_part
        slot = s0 + lane
        valid = (slot >= valid_from) & (slot < valid_to)
        logits = jnp.where(valid[None, :], (logits + bias[:, None]) * qk_scale, -jnp.inf)
        m_new = jnp.maximum(m_run, jnp.max(logits, axis=1))
        alpha = jnp.exp2(m_run - m_new)
        p = jnp.exp2(logits - m_new[:, None])  # masked slots: exp2(-inf) = 0
        l_new = l_run * alpha + jnp.sum(p, axis=1)
        # masked slots' scales and zeros are zeroed: p = 0 there, but 0 * (inf or NaN in never-written storage)
        # would still poison the sums
        folded = {}
        new_accs = []
        for j, acc in enumerate(accs):
            ch = j * c
            g = ch // value_group
            if g not in folded:
                v_scale = jnp.where(valid, vs_ref[slots, g].astype(jnp.float32), 0.0)  # [bk]
                v_zero = jnp.where(valid, vz_ref[slots, g].astype(jnp.float32), 0.0)
                folded[g] = ((p * v_scale[None, :]).astype(dot_dtype), jnp.sum(p * v_zero[None, :], axis=1))
            p_scaled, zero_sum = folded[g]
            v_bytes = vc_ref[slots, pl.ds(ch % m, c)]  # [bk, c] bytes holding channels [ch, ch + c)
            new_accs.append(acc * alpha[:, None] + _flash.dot(p_scaled, plane(v_bytes, ch // m)) + zero_sum[:, None])
        return tuple(new_accs), m_new, l_new

    rows = q_ref.shape[0]
    init = (
        tuple(jnp.zeros((rows, c), jnp.float32) for _ in range(head_dim // c)),
        jnp.full((rows,), _common.M_FLOOR, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if residual_split is None:
        acc_ref, m_ref, l_ref = refs
    else:
        n_res_ref, rk_ref, rv_ref, acc_ref, m_ref, l_ref = refs

    def quantised():
        accs, m_run, l_run = jax.lax.fori_loop(0, n_blocks, body, init)
        for j, acc in enumerate(accs):
            acc_ref[:, pl.ds(j * c, c)] = acc
        m_ref[...], l_ref[...] = m_run, l_run

    if residual_split is None:
        quantised()
    else:
        pl.when(split != residual_split)(quantised)

        @pl.when(split == residual_split)
        def _residual():
            valid = jnp.arange(rk_ref.shape[0], dtype=jnp.int32) < n_res_ref[0]
            k = rk_ref[...].astype(dot_dtype)
            v = jnp.where(valid[:, None], rv_ref[...], 0).astype(dot_dtype)  # stale rows may hold NaN: 0 * NaN
            acc, m_run, l_run = _flash.update(
                _flash.init_state(rows, head_dim), q_ref[...].astype(dot_dtype), k, v, qk_scale, valid[None, :]
            )
            acc_ref[...], m_ref[...], l_ref[...] = acc, m_run, l_run


def _check_inputs(
    name: str,
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    n_quant,
    res_k,
    res_v,
    n_res,
    first,
    bits: int,
    key_group: int,
    value_group: int,
) -> None:
    """Shape/dtype agreement of the cache pieces; errors name the offending array."""
    if q.ndim != 3:
        raise ValueError(f"{name}: q must be [batch, heads, head_dim]; got {q.shape}.")
    batch, heads, head_dim = q.shape
    if bits not in KERNEL_BITS:
        raise ValueError(f"{name}: bits={bits}; KIVI supports bits in {KERNEL_BITS}.")
    if key_group <= 0 or value_group <= 0 or head_dim % value_group:
        raise ValueError(
            f"{name}: key_group={key_group} must be positive and value_group={value_group} must "
            f"divide head_dim={head_dim}."
        )
    if head_dim % (8 // bits):
        raise ValueError(f"{name}: head_dim={head_dim} does not fill whole bytes of {bits}-bit codes.")
    if k_codes.ndim != 4:
        raise ValueError(
            f"{name}: k_codes must be [batch, capacity, kv_heads, head_dim * bits / 8]; got {k_codes.shape}."
        )
    _, capacity, kv_heads, _ = k_codes.shape
    if capacity % key_group:
        raise ValueError(f"{name}: capacity={capacity} is not a multiple of key_group={key_group}.")
    expected = {
        "k_codes": ((batch, capacity, kv_heads, head_dim * bits // 8), (jnp.uint8,)),
        "v_codes": ((batch, capacity, kv_heads, head_dim * bits // 8), (jnp.uint8,)),
        "k_scale": ((batch, capacity // key_group, kv_heads, head_dim), None),
        "k_zero": ((batch, capacity // key_group, kv_heads, head_dim), None),
        "v_scale": ((batch, capacity, kv_heads, head_dim // value_group), None),
        "v_zero": ((batch, capacity, kv_heads, head_dim // value_group), None),
        "n_quant": ((batch,), None),
        "n_res": ((batch,), None),
    }
    arrays = dict(
        k_codes=k_codes,
        v_codes=v_codes,
        k_scale=k_scale,
        k_zero=k_zero,
        v_scale=v_scale,
        v_zero=v_zero,
        n_quant=n_quant,
        n_res=n_res,
    )
    if first is not None:
        expected["first"], arrays["first"] = ((batch,), None), first
    for key, (shape, dtypes) in expected.items():
        x = arrays[key]
        if tuple(x.shape) != shape or (dtypes is not None and x.dtype not in dtypes):
            raise ValueError(
                f"{name}: {key} is {x.dtype}{list(x.shape)}; expected shape {list(shape)}"
                + (" uint8" if dtypes else "")
                + f" for q {list(q.shape)}, capacity={capacity}, "
                f"kv_heads={kv_heads}, bits={bits}, key_group={key_group}, value_group={value_group}."
            )
    if heads % kv_heads:
        raise ValueError(f"{name}: heads={heads} is not a multiple of kv_heads={kv_heads}.")
    if (
        res_k.ndim != 4
        or res_k.shape != res_v.shape
        or res_k.shape[0] != batch
        or res_k.shape[2:] != (kv_heads, head_dim)
    ):
        raise ValueError(
            f"{name}: res_k, res_v must both be [batch={batch}, R, kv_heads={kv_heads}, "
            f"head_dim={head_dim}]; got {res_k.shape}, {res_v.shape}."
        )


def _residual_partial(
    qg: jax.Array, res_k: jax.Array, res_v: jax.Array, n_res: jax.Array, qk_scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The residual rows' partial in the kernel's convention (base-2 logits, max floored at M_FLOOR).
    qg fp32 `[batch, kv_heads, rows, d]`; res_k, res_v `[batch, R, kv_heads, d]`; n_res int32 `[batch]`.
    Returns acc `[batch, kv_heads, 1, rows, d]`, m and l `[batch, kv_heads, 1, rows]`."""
    hp = jax.lax.Precision.HIGHEST  # tiny; keep it exact on GPU too (no TF32)
    s = jnp.einsum("bhrd,bthd->bhrt", qg, res_k.astype(jnp.float32), precision=hp) * qk_scale
    valid = jnp.arange(res_k.shape[1])[None, :] < n_res[:, None]  # [batch, R]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.maximum(jnp.max(s, axis=-1), _common.M_FLOOR)
    p = jnp.exp2(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    res_v = jnp.where(valid[:, :, None, None], res_v.astype(jnp.float32), 0.0)  # stale rows: 0 * NaN = NaN
    acc = jnp.einsum("bhrt,bthd->bhrd", p, res_v, precision=hp)
    return acc[:, :, None], m[:, :, None], l[:, :, None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "bits",
        "key_group",
        "value_group",
        "block_k",
        "num_splits",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def kivi_decode_attention(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    k_zero: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    v_zero: jax.Array,
    n_quant: jax.Array,
    res_k: jax.Array,
    res_v: jax.Array,
    n_res: jax.Array,
    *,
    scale: float,
    bits: int,
    key_group: int = 32,
    value_group: int = 32,
    first: jax.Array | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one new token per sequence over a KIVI cache layer plus its full-precision residual.

    q: `[batch, heads, head_dim]` (bf16/fp16/fp32; heads a multiple of kv_heads, head h reads kv head
    h // (heads // kv_heads)). k_codes, v_codes: uint8 `[batch, capacity, kv_heads, head_dim * bits / 8]`
    (planar). k_scale, k_zero: `[batch, capacity / key_group, kv_heads, head_dim]`; v_scale, v_zero:
    `[batch, capacity, kv_heads, head_dim / value_group]` (fp16 as stored). n_quant: int32 `[batch]`, quantised
    slots [first, n_quant) are valid; first: optional int32 `[batch]` (default 0). res_k, res_v:
    `[batch, R, kv_heads, head_dim]`, rows [0, n_res) valid (n_res int32 `[batch]`). Returns `[batch, heads,
    head_dim]` in q's dtype; zeros for a sequence with no valid key.

    block_k (default key_group; a power of two >= 16 dividing key_group), num_splits (default 132 key ranges
    per sequence and KV head, fewer for short caches), num_warps (default 4 for one sequence, 2 for a batch),
    num_stages tune speed only. Raises ValueError for configurations the kernel does not handle
    (`kivi_kernel_supported`) or for inconsistent shapes.
    """
    name = "kivi_decode_attention"
    _check_inputs(
        name,
        q,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        n_quant,
        res_k,
        res_v,
        n_res,
        first,
        bits,
        key_group,
        value_group,
    )
    batch, heads, head_dim = q.shape
    _, capacity, kv_heads, n_bytes = k_codes.shape
    why = _unsupported(head_dim, bits, key_group, value_group)
    if why is not None:
        raise ValueError(f"{name}: {why}; use kivi_decode_attention_reference.")
    if q.dtype not in _common.SUPPORTED_DTYPES:
        raise ValueError(f"{name}: q is {q.dtype}; supported: bfloat16, float16, float32.")
    block_k = key_group if block_k is None else block_k
    if not _pow2(block_k) or block_k < MIN_DOT or key_group % block_k:
        raise ValueError(
            f"{name}: block_k={block_k} must be a power of two >= 16 dividing key_group={key_group} "
            f"(a block must lie within one key-scale row)."
        )
    # capacity % key_group == 0 was checked, so capacity is a multiple of block_k: no padding copy of the cache
    for key, x in (("k_codes", k_codes), ("v_codes", v_codes), ("v_scale", v_scale)):
        if x.size > _common.MAX_KERNEL_ELEMENTS:
            raise ValueError(
                f"{name}: {key} has {x.size} elements; Triton's int32 offsets stop at 2^31 - 1 "
                f"(call per slice of the batch)."
            )
    group = heads // kv_heads
    rows = max(MIN_ROWS, 1 << (group - 1).bit_length())
    qg = _common.pad_to(q.reshape(batch, kv_heads, group, head_dim), 2, rows)
    first = jnp.zeros((batch,), jnp.int32) if first is None else first.astype(jnp.int32)
    # latency-bound, so it wants more programs than the dense kernel: 132 splits per (sequence, KV head) and 3
    # stages were the fastest on the H100 (docs/kernel-notes.md)
    n_splits, split_len = _splits(
        capacity, block_k, batch * kv_heads, min(-(-capacity // block_k), 132) if num_splits is None else num_splits
    )
    # the residual rows as one more split when they make a Triton tile (a power of two >= 16 rows), else in XLA
    res_len = res_k.shape[1]
    in_kernel = res_len >= MIN_DOT and _pow2(res_len)
    qk_scale = scale * _common.LOG2E
    kernel = functools.partial(
        _kernel,
        bits=bits,
        head_dim=head_dim,
        key_group=key_group,
        value_group=value_group,
        block_k=block_k,
        split_len=split_len,
        qk_scale=qk_scale,
        dot_dtype=q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32,
        residual_split=n_splits if in_kernel else None,
    )
    whole = lambda length, width: pl.BlockSpec((None, length, None, width), lambda b, h, s: (b, 0, h, 0))
    per_sequence = pl.BlockSpec((None, 1), lambda b, h, s: (b, 0))
    in_specs = [
        per_sequence,
        per_sequence,
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
        whole(capacity, n_bytes),
        whole(capacity // key_group, head_dim),
        whole(capacity // key_group, head_dim),
        whole(capacity, n_bytes),
        whole(capacity, head_dim // value_group),
        whole(capacity, head_dim // value_group),
    ]
    args = [n_quant.astype(jnp.int32)[:, None], first[:, None], qg, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero]
    if in_kernel:
        in_specs += [per_sequence, whole(res_len, head_dim), whole(res_len, head_dim)]
        args += [n_res.astype(jnp.int32)[:, None], res_k, res_v]
    grid_splits = n_splits + in_kernel
    out_specs, out_shape = split_partials(batch, kv_heads, grid_splits, rows, head_dim)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, grid_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # with a batch, programs of 2 warps were faster than of 4 on the H100; for one sequence neither won
        # (docs/kernel-notes.md)
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if batch == 1 else 2), num_stages=num_stages or 3
        ),
        interpret=interpret,
        name="kivi_decode_attention",
    )(*args)
    if not in_kernel:
        r_acc, r_m, r_l = _residual_partial(qg.astype(jnp.float32), res_k, res_v, n_res.astype(jnp.int32), qk_scale)
        acc, m, l = (jnp.concatenate(pair, axis=2) for pair in ((acc, r_acc), (m, r_m), (l, r_l)))
    out = merge_splits(acc, m, l)  # [batch, kv_heads, rows, d]
    return out[:, :, :group].reshape(batch, heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "bits", "key_group", "value_group"))
def kivi_decode_attention_reference(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    k_zero: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    v_zero: jax.Array,
    n_quant: jax.Array,
    res_k: jax.Array,
    res_v: jax.Array,
    n_res: jax.Array,
    *,
    scale: float,
    bits: int,
    key_group: int = 32,
    value_group: int = 32,
    first: jax.Array | None = None,
) -> jax.Array:
    """`kivi_decode_attention` in plain XLA, for any configuration kivi_quant handles: the cache dequantised
    with `kivi_quant.dequantize` (a full-size fp32 temporary), the residual appended, an fp32 softmax over the
    valid slots (GQA by reshaping q). Same arguments and result."""
    _check_inputs(
        "kivi_decode_attention_reference",
        q,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        n_quant,
        res_k,
        res_v,
        n_res,
        first,
        bits,
        key_group,
        value_group,
    )
    batch, heads, head_dim = q.shape
    capacity, kv_heads = k_codes.shape[1], k_codes.shape[2]
    shape = (batch, capacity, kv_heads, head_dim)
    keys = dequantize(QuantizedTensor(k_codes, k_scale, k_zero, bits, key_group, TOKEN, shape, "float32"))
    values = dequantize(QuantizedTensor(v_codes, v_scale, v_zero, bits, value_group, CHANNEL, shape, "float32"))
    k = jnp.concatenate([keys, res_k.astype(jnp.float32)], axis=1)
    v = jnp.concatenate([values, res_v.astype(jnp.float32)], axis=1)
    slot = jnp.arange(capacity)[None, :]
    lo = jnp.zeros((batch,), jnp.int32) if first is None else first
    valid = jnp.concatenate(
        [(slot >= lo[:, None]) & (slot < n_quant[:, None]), jnp.arange(res_k.shape[1])[None, :] < n_res[:, None]],
        axis=1,
    )  # [batch, cap + R]
    v = jnp.where(valid[:, :, None, None], v, 0.0)  # never-written slots may hold inf/NaN: 0 * NaN = NaN
    hp = jax.lax.Precision.HIGHEST
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k, precision=hp) * scale
    p = masked_softmax(s, valid[:, None, None, :])
    out = jnp.einsum("bkgt,btkd->bkgd", p, v, precision=hp)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
