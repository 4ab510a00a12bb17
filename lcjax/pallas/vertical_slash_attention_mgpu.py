"""Vertical-slash attention with MInference's "cover" semantics for Hopper GPUs: a Mosaic GPU kernel.

Same result as `vertical_slash_attention_ranges(..., semantics="cover")` (the reference is
`vertical_slash_cover_reference`): query i of block r0 = 64 * (i // 64) attends, causally, every key of the
ranges [r0 - D1, r0 + 63 - D0] MInference merges from its slash windows (`build_vertical_slash_ranges(...,
semantics="cover")`: whole 64-key chunks, so only chunks that cross the diagonal, or key 0, need a mask) and every
vertical column.

Schedule of one query block (64 rows):
1. per slash group, the range [lo, hi] in 64-key chunks from lo (any key: see `_mosaic_forward`): chunks wholly
   inside the range and at or before the block's first row run without a mask, the others with causal & in-range;
2. the vertical columns before r0 that lie in none of the block's ranges, 64 at a time from per-head
   gathered copies of K and V (`MgpuColumns`), masked by one bit per column (two scalar words per chunk);
3. if any such column falls in [r0, r0 + 63], the block's diagonal 64 keys once more, masked by causality and
   those columns' bits.
So every allowed pair is counted once: ranges are disjoint, and a column inside a range is left to the range.

One CTA holds two neighbouring query blocks of one head, each with its own compute warpgroup (64 rows, wgmma).
Their walks share K/V tiles: block r0 + 64's range of a group is block r0's moved 64 keys on, so one memory
warpgroup streams each group's chunks from the first block's lo to the second block's hi through one ring of
`stages` shared-memory slots, and each compute warpgroup skips the chunk only the other block needs (the
first chunk, or the last); the column chunks are per head, so they are shared too; the diagonal tiles are not.
A run of unmasked chunks goes two at a time, software-pipelined inside the warpgroup (the second QK^T overlaps
the first softmax, the first PV the second softmax).
Hopper only, bfloat16/float16, head_dim 64 or 128 (96 zero-padded to 128); its tests run on the device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcjax.pallas import _common
from lcjax.pallas.block_sparse_attention_mgpu import (
    ROWS_PER_WG,
    SMEM_BYTES,
    WGMMA_TILES,
    check_dtype,
    copy_kv_tile,
    init_softmax_state,
    rescale,
    score_update,
    smem_bytes,
    softmax_update,
    store_rows,
)
from lcjax.pallas.vertical_slash_index import _sorted_unique
from lcjax.pallas.vertical_slash_ranges import (
    VerticalSlashRanges,
    build_vertical_slash_ranges,
    columns_in_ranges,
    range_offsets,
)

BLOCK = ROWS_PER_WG  # query rows per block = keys per chunk = MInference's 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MgpuColumns:
    """The vertical columns as the Hopper kernel reads them; nqb = query blocks rounded up to even.

    columns: int32 `[batch, heads, NV]` each head's columns ascending (padding: q_len), NV a multiple of 64.
    before_words: int32 `[batch, heads, nqb, NV // 32]`: bit p of word w set iff column 32 w + p is before the
      block's first row r0 and in none of the block's ranges.
    column_chunks: int32 `[batch, heads, nqb]`: 64-column chunks to visit (up to the last set bit).
    diagonal_words: int32 `[batch, heads, nqb, 2]`: bit t set iff key r0 + t is such a column (t < 64).
    """

    columns: jax.Array
    before_words: jax.Array
    column_chunks: jax.Array
    diagonal_words: jax.Array


def _pack_bits(bits: jax.Array) -> jax.Array:
    """bool `[..., 32 n]` -> int32 `[..., n]`, bit p of word w = bits[32 w + p]."""
    words = bits.reshape(*bits.shape[:-1], -1, 32).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
    return lax.bitcast_convert_type(jnp.sum(words, axis=-1, dtype=jnp.uint32), jnp.int32)


def require_cover(index: VerticalSlashRanges, name: str) -> None:
    """The error for an index not built with the cover semantics this kernel runs."""
    if index.semantics != "cover":
        raise ValueError(
            f"{name}: the Hopper vertical-slash kernel runs MInference's cover semantics; the index was "
            f"built with semantics={index.semantics!r} (use build_mgpu_index, or "
            'build_vertical_slash_ranges(..., semantics="cover")).'
        )


@functools.partial(jax.jit, static_argnames=("q_len",))
def build_mgpu_columns(vertical_indices: jax.Array, index: VerticalSlashRanges, q_len: int) -> MgpuColumns:
    """The column lists of `vertical_slash_attention_mgpu` from the same verticals as `index` (int32
    `[batch, heads, n_vertical]`, any order; duplicates and values outside [0, q_len) dropped)."""
    if index.block != BLOCK:
        raise ValueError(f"the Hopper vertical-slash kernel runs 64-row blocks; the index has block={index.block}.")
    require_cover(index, "build_mgpu_columns")
    padded = index.is_slash.shape[-1]
    nqb = padded // BLOCK
    nqb_even = nqb + nqb % 2
    verticals = _sorted_unique(vertical_indices.astype(jnp.int32), q_len)
    n_pad = max(BLOCK, -(-verticals.shape[-1] // BLOCK) * BLOCK)
    verticals = jnp.pad(verticals, [(0, 0), (0, 0), (0, n_pad - verticals.shape[-1])], constant_values=q_len)
    in_range = range_offsets(index)  # [b, h, padded + 129]
    r0 = (jnp.arange(nqb_even, dtype=jnp.int32) * BLOCK)[:, None]
    j = verticals[:, :, None, :]  # [b, h, 1, NV]
    meets = columns_in_ranges(in_range, verticals, r0, BLOCK)
    before = (j < r0) & (j < q_len) & ~meets  # a real column before the block, in none of its ranges: [b, h, nqb, NV]
    position = jnp.arange(n_pad, dtype=jnp.int32)
    last = jnp.max(jnp.where(before, position, -1), axis=-1)
    # key r0 + t of the block's own 64 (offset -t) lies in a range: the same test for every block
    t = jnp.arange(BLOCK, dtype=jnp.int32)
    diagonal_free = in_range[..., 2 * BLOCK - t] == 0  # [b, h, 64]
    is_vertical = _common.pad_to(index.is_vertical, 2, nqb_even * BLOCK).reshape(*j.shape[:2], nqb_even, BLOCK)
    diagonal = (is_vertical != 0) & diagonal_free[:, :, None, :]
    return MgpuColumns(
        columns=verticals,
        before_words=_pack_bits(before),
        column_chunks=(last + BLOCK) // BLOCK,
        diagonal_words=_pack_bits(diagonal),
    )


def build_mgpu_index(
    vertical_indices: jax.Array, slash_offsets: jax.Array, q_len: int
) -> tuple[VerticalSlashRanges, MgpuColumns]:
    """Everything `vertical_slash_attention_mgpu` reads, from `[batch, heads, n]` int32 vertical columns and
    slash offsets (any order; duplicates and values outside [0, q_len) dropped): the range schedule without its
    per-block column lists (this kernel keeps its own) and the `MgpuColumns`."""
    ranges = build_vertical_slash_ranges(
        vertical_indices, slash_offsets, q_len, BLOCK, columns=False, semantics="cover"
    )
    return ranges, build_mgpu_columns(vertical_indices, ranges, q_len)


def _bit_mask(shape, w0, w1):
    """bool `shape` (rows, 64): column lane t's bit from the two words (lanes 0-31 in w0, 32-63 in w1)."""
    lane = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    word = jnp.where(lane < 32, w0, w1)
    return (lax.shift_right_logical(word, lane & 31) & 1) != 0


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    kc_ref,
    vc_ref,
    start_ref,
    end_ref,
    gcount_ref,
    words_ref,
    chunks_ref,
    diag_ref,
    o_ref,
    scoped,
    *,
    stages: int,
    num_pairs: int,
    groups: int,
    padded: int,
    qk_scale: float,
):
    q_smem, (k_mma, k_tma), (v_mma, v_tma), (k_ready, v_ready, k_free, v_free, q_ready) = scoped
    halves = q_smem.shape[1]  # head_dim / 64: each 64-column half is its own swizzled tile
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    pair = num_pairs - 1 - lax.axis_index("pairs")  # longest first
    wg = lax.axis_index("wg")
    qb0 = 2 * pair
    r = (qb0 * BLOCK, qb0 * BLOCK + BLOCK)  # first rows of the pair's two blocks
    n_groups = (gcount_ref[b, h, qb0], gcount_ref[b, h, qb0 + 1])  # a prefix of one list (a padding block: 0)
    n_pair_groups = jnp.maximum(*n_groups)
    n_chunks = (chunks_ref[b, h, qb0], chunks_ref[b, h, qb0 + 1])
    diag_words = tuple((diag_ref[b, h, qb0 + i, 0], diag_ref[b, h, qb0 + i, 1]) for i in range(2))
    has_diagonal = tuple(((w0 | w1) != 0).astype(jnp.int32) for w0, w1 in diag_words)
    kv_head = lax.div(h, groups)

    def span(n, i):
        """Group n for block i: its key range [lo, hi], and in the pair's chunk walk of the group (64-key chunks
        from `first`, `count` of them) the chunks it computes, [c_lo, c_hi), of which [p_lo, p_hi) unmasked."""
        end, start = end_ref[b, h, n], start_ref[b, h, n]
        lo = jnp.maximum(r[i] - end, 0)
        hi = r[i] + BLOCK - 1 - start
        first = jnp.where(n < n_groups[0], jnp.maximum(r[0] - end, 0), jnp.maximum(r[1] - end, 0))
        count = lax.div(r[1] + BLOCK - 1 - start - first + BLOCK, BLOCK)  # to the second block's hi (the larger)
        c_lo = lax.div(lo - first, BLOCK)
        p_lo = c_lo + (lax.rem(lo - first, BLOCK) != 0).astype(jnp.int32)
        c_hi = lax.div(hi - first, BLOCK) + 1
        p_hi = jnp.maximum(p_lo, lax.div(jnp.minimum(hi, r[i]) - first + 1, BLOCK))
        live = n < n_groups[i]
        c_lo, p_lo, p_hi, c_hi = (jnp.where(live, x, count) for x in (c_lo, p_lo, p_hi, c_hi))
        return lo, hi, first, count, (c_lo, p_lo, p_hi, c_hi)

    def halves_of(ref, rows):
        return [ref.at[(*rows, pl.ds(c * 64, 64))] for c in range(halves)]

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        me = wg
        my_q = q_smem.at[me]
        r0 = qb0 * BLOCK + me * BLOCK
        for c, src in enumerate(halves_of(q_ref, (b, pl.ds(r0, BLOCK), h))):
            plgpu.copy_gmem_to_smem(src, my_q.at[c], q_ready.at[me])
        plgpu.barrier_wait(q_ready.at[me])
        # Q in registers for every QK^T: shared memory then carries only the K tile (at 64 keys a step,
        # re-reading Q from it would double QK^T's shared-memory traffic)
        q_regs = [plgpu.load(my_q.at[c], layout=plgpu.Layout.WGMMA) for c in range(halves)]
        # row and key indices of a score tile, made where a mask needs them (held across the loop they would
        # take 64 registers)
        rows = lambda: r0 + plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=plgpu.Layout.WGMMA)
        lanes = lambda: plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=plgpu.Layout.WGMMA)

        def tile(mask, carry):
            acc, m, l, step = carry
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk_scope(s_ref):
                for c in range(halves):
                    plgpu.wgmma(s_ref, q_regs[c], k_mma.at[slot, c].transpose((1, 0)))
                return s_ref[...]

            s = pl.run_scoped(qk_scope, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if mask is not None:
                s = jnp.where(mask(), s, -jnp.inf)
            acc, m_new, l, p = softmax_update(s, acc, m, l, qk_scale, q_smem.dtype)
            plgpu.barrier_wait(v_ready.at[slot])

            def pv_scope(acc_refs):
                for c in range(halves):
                    plgpu.wgmma(acc_refs[c], p, v_mma.at[slot, c])

            acc = pl.run_state(pv_scope)(tuple(plgpu.ACC.init(a) for a in acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l, step + 1

        def tile2(_, carry):
            """Two unmasked chunks in a row as two software-pipelined steps: the second QK^T runs while the first
            step's softmax does, and the first PV while the second softmax does."""
            acc, m, l, step = carry
            slots = [lax.rem(step + t, stages) for t in range(2)]
            for slot in slots:
                plgpu.barrier_wait(k_ready.at[slot])

            def scope(s_first, s_second, *o_refs):
                for s_ref, slot in ((s_first, slots[0]), (s_second, slots[1])):
                    for c in range(halves):
                        plgpu.wgmma(s_ref, q_regs[c], k_mma.at[slot, c].transpose((1, 0)))
                m_l, out = (m, l), acc
                for t, s_ref in enumerate((s_first, s_second)):
                    s = plgpu.wgmma_accumulator_load(s_ref, wait_n=halves)  # leaves the last issued one running
                    plgpu.barrier_arrive(k_free.at[slots[t]])
                    m_new, alpha, l_new, p = score_update(s, *m_l, qk_scale, q_smem.dtype)
                    if t:  # the first PV must be done before the output is rescaled
                        out = tuple(o[...] for o in o_refs)
                        plgpu.barrier_arrive(v_free.at[slots[0]])
                    for o, a in zip(o_refs, rescale(out, alpha)):
                        o[...] = a
                    plgpu.barrier_wait(v_ready.at[slots[t]])
                    for c, o in enumerate(o_refs):
                        plgpu.wgmma(o, p, v_mma.at[slots[t], c])
                    m_l = (m_new, l_new)
                out = tuple(o[...] for o in o_refs)
                plgpu.barrier_arrive(v_free.at[slots[1]])
                return out, *m_l

            acc, m, l = pl.run_scoped(scope, *[plgpu.ACC((BLOCK, BLOCK), jnp.float32) for _ in range(2 + halves)])
            return acc, m, l, step + 2

        def skip(_, carry):  # a tile only the other block uses: pass the slot on
            acc, m, l, step = carry
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m, l, step + 1

        def range_mask(start, lo, hi):
            def mask():
                keys = jnp.minimum(start, padded - BLOCK) + lanes()  # the load stays inside K/V (as the producer's)
                return (keys >= jnp.maximum(start, lo)) & (keys <= hi) & (keys <= rows())

            return mask

        def group(n, carry):
            spans = [span(n, i) for i in range(2)]
            lo, hi, first, count, (c_lo, p_lo, p_hi, c_hi) = jax.tree.map(lambda a, b: jnp.where(me == 0, a, b), *spans)
            # the unmasked run two chunks at a time (`tile2`), masked chunks one at a time (pairing those was
            # slower on the estimated set: their masks, not the waits, dominate there)
            masked = lambda c, cr: tile(range_mask(first + c * BLOCK, lo, hi), cr)
            carry = lax.fori_loop(0, c_lo, skip, carry)
            carry = lax.fori_loop(c_lo, p_lo, masked, carry)
            odd = p_lo + (p_hi - p_lo) // 2 * 2
            carry = lax.fori_loop(0, (odd - p_lo) // 2, tile2, carry)
            carry = lax.fori_loop(odd, p_hi, lambda c, cr: tile(None, cr), carry)
            carry = lax.fori_loop(p_hi, c_hi, masked, carry)
            return lax.fori_loop(c_hi, count, skip, carry)

        my = lambda pair_values: jnp.where(me == 0, *pair_values)
        my_chunks = my(n_chunks)
        w = lambda c, k: words_ref[b, h, qb0 + me, 2 * c + k]

        def column(c, carry):
            w0, w1 = w(c, 0), w(c, 1)
            return tile(lambda: _bit_mask((BLOCK, BLOCK), w0, w1), carry)

        d0w, d1w = my(tuple(d[0] for d in diag_words)), my(tuple(d[1] for d in diag_words))

        def diagonal(_, carry):
            return tile(lambda: _bit_mask((BLOCK, BLOCK), d0w, d1w) & (r0 + lanes() <= rows()), carry)

        _, m, l = init_softmax_state(64)
        acc = tuple(init_softmax_state(64)[0] for _ in range(halves))
        carry = lax.fori_loop(0, n_pair_groups, group, (acc, m, l, jnp.int32(0)))
        carry = lax.fori_loop(0, my_chunks, column, carry)
        carry = lax.fori_loop(my_chunks, jnp.maximum(*n_chunks), skip, carry)
        for i in range(2):  # block 0's diagonal tile, then block 1's: each computes its own, skips the other's
            mine = (me == i).astype(jnp.int32)
            carry = lax.fori_loop(0, has_diagonal[i] * mine, diagonal, carry)
            carry = lax.fori_loop(0, has_diagonal[i] * (1 - mine), skip, carry)
        acc, m, l, _ = carry
        for c, dst in enumerate(halves_of(o_ref, (b, pl.ds(r0, BLOCK), h))):
            store_rows(acc[c], l, my_q.at[c], dst)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def fetch(k_src, v_src, step):
            """K's and V's halves into the ring's next slot; a slot is refilled once both blocks freed it."""
            slot = lax.rem(step, stages)
            copy_kv_tile(
                k_src,
                v_src,
                [k_tma.at[slot, c] for c in range(halves)],
                [v_tma.at[slot, c] for c in range(halves)],
                (k_ready.at[slot], v_ready.at[slot]),
                (k_free.at[slot], v_free.at[slot]),
                step >= stages,
            )
            return step + 1

        def keys_at(first, step):  # any row: the copies land in the (1, 64)-tiled view (see _mosaic_forward)
            rows = (b, pl.ds(first, BLOCK), kv_head)
            return fetch(halves_of(k_ref, rows), halves_of(v_ref, rows), step)

        def group(n, step):
            _, _, first, count, _ = span(n, 1)
            return lax.fori_loop(
                0, count, lambda c, st: keys_at(jnp.minimum(first + c * BLOCK, padded - BLOCK), st), step
            )

        def column(c, step):
            rows = (b, h, pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK))
            return fetch(halves_of(kc_ref, rows), halves_of(vc_ref, rows), step)

        step = lax.fori_loop(0, n_pair_groups, group, jnp.int32(0))
        step = lax.fori_loop(0, jnp.maximum(*n_chunks), column, step)
        for i in range(2):
            step = lax.fori_loop(0, has_diagonal[i], lambda _, st, i=i: keys_at(r[i], st), step)


def _mosaic_forward(
    q, k, v, kc, vc, index: VerticalSlashRanges, columns: MgpuColumns, *, scale: float, stages: int
) -> jax.Array:
    """The kernel on padded arrays: q, k, v `[b, L, h|kvh, d]`, L = (even nqb) * 64; kc, vc `[b, h, NV, d]`."""
    batch, padded, heads, head_dim = q.shape
    num_pairs = padded // (2 * BLOCK)
    counts = _common.pad_to(index.group_counts, 2, 2 * num_pairs)
    kernel = functools.partial(
        _kernel,
        stages=stages,
        num_pairs=num_pairs,
        groups=heads // k.shape[2],
        padded=padded,
        qk_scale=scale * _common.LOG2E,
    )
    halves = head_dim // 64
    row_tiles = dict(transforms=(plgpu.TilingTransform((1, 64)), plgpu.SwizzleTransform(128)))
    # wgmma reads 8-row tiles; a TMA copy into an 8-row tiling must start at a multiple of 8 rows. A 64-row,
    # 64-column tile is laid out the same under (8, 64) and (1, 64) tiling, so the copies go through a
    # (1, 64)-tiled view of the same bytes and may start at any key.
    ring = lambda: plgpu.RefUnion(
        plgpu.SMEM((stages, halves, BLOCK, 64), q.dtype, **WGMMA_TILES),
        plgpu.SMEM((stages, halves, BLOCK, 64), q.dtype, **row_tiles),
    )

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            plgpu.SMEM((2, halves, BLOCK, 64), q.dtype, **WGMMA_TILES),
            ring(),
            ring(),
            (
                plgpu.Barrier(num_arrivals=halves, num_barriers=stages),
                plgpu.Barrier(num_arrivals=halves, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=halves, num_barriers=2),
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(heads, num_pairs, batch),
        grid_names=("heads", "pairs", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(
        q,
        k,
        v,
        kc,
        vc,
        index.group_start,
        index.group_end,
        counts,
        columns.before_words,
        columns.column_chunks,
        columns.diagonal_words,
    )


def _gather_columns(k: jax.Array, columns: jax.Array, heads: int) -> jax.Array:
    """k `[b, L, kvh, d]`, columns int32 `[b, h, NV]` -> `[b, h, NV, d]`: query head h's columns from its KV head."""
    groups = heads // k.shape[2]
    kv_of = jnp.arange(heads) // groups
    rows = jnp.clip(columns, 0, k.shape[1] - 1)
    bi = jnp.arange(k.shape[0])[:, None, None]
    return k[bi, rows, kv_of[None, :, None]]


@functools.partial(jax.jit, static_argnames=("scale", "stages"))
def vertical_slash_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashRanges,
    columns: MgpuColumns,
    *,
    scale: float,
    stages: int = 2,
) -> jax.Array:
    """Causal prefill under the vertical-slash pattern with MInference's cover semantics, on Hopper.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, q_len, kv_heads, head_dim]`; bfloat16 or float16;
    head_dim 64, 96 or 128. index, columns: `build_mgpu_index(vertical, slash, q_len)` (or
    `build_vertical_slash_ranges(vertical, slash, q_len, 64)` and `build_mgpu_columns(vertical, index, q_len)`).
    Returns `[batch, q_len, heads, head_dim]` in q's dtype; equals `vertical_slash_cover_reference` up to
    rounding. stages: K/V slots of the ring the two query blocks of a CTA share.
    """
    _common.check_inputs("vertical_slash_attention_mgpu", q, k, v)
    check_dtype("vertical_slash_attention_mgpu", q)
    batch, q_len, heads, head_dim = q.shape
    require_cover(index, "vertical_slash_attention_mgpu")
    if k.shape[1] != q_len or index.q_len != q_len or index.block != BLOCK:
        raise ValueError(
            f"vertical_slash_attention_mgpu is causal prefill with 64-row blocks: q_len={q_len}, "
            f"kv_len={k.shape[1]}, index q_len={index.q_len}, block={index.block}."
        )
    d_pad = _common.padded_head_dim(head_dim)
    if (need := smem_bytes(2 * BLOCK, BLOCK, stages, d_pad)) > SMEM_BYTES:  # two query blocks, one shared ring
        raise ValueError(
            f"vertical_slash_attention_mgpu: stages={stages} needs {need} bytes of shared memory "
            f"at head_dim {d_pad}, more than {SMEM_BYTES}."
        )
    padded = columns.column_chunks.shape[-1] * BLOCK

    def run(q, k, v, per_head):
        index, columns = per_head
        q_p, k_p, v_p = (_common.pad_to(_common.pad_to(x, 1, padded), 3, d_pad) for x in (q, k, v))
        kc, vc = (_gather_columns(x, columns.columns, q.shape[2]) for x in (k_p, v_p))
        out = _mosaic_forward(q_p, k_p, v_p, kc, vc, index, columns, scale=scale, stages=stages)
        return out[:, :q_len, :, :head_dim]

    return _common.by_head_groups(run, q, k, v, (index, columns), padded_len=padded, padded_head_dim=d_pad)
