"""Vertical-slash attention over unaligned key ranges (MInference's schedule, lcjax's exact semantics).

Same pattern and result as `vertical_slash_attention` (query i attends key j iff j <= i and (j is a vertical
column or i - j is a slash offset), exactly), but slashes are covered the way MInference's kernel covers them:
for query block rows [r0, r0 + b) a run of slash offsets [d0, d1] needs the contiguous keys
[r0 - d1, r0 + b - 1 - d0], loaded in chunks of b keys from the (unaligned) range start.

Schedule (`build_vertical_slash_ranges`, plain jnp):
- Per head the sorted slash offsets are merged into *groups*: maximal chains whose consecutive offsets differ
  by at most b. Two runs [d0, d1] < [d0', d1'] give overlapping or touching key ranges in every query block
  iff d0' - d1 <= b, so this merge is the same for every query block, and the groups' key ranges
  [max(0, r0 - D1), r0 + b - 1 - D0] are disjoint. So a head needs one list of groups (D0, D1) ascending, and
  query block qb uses the prefix with D0 <= r0 + b - 1 (`group_counts`); no per-query-block range lists.
  Group starts are >= b + 1 apart, so a head has at most min(n_slash, (q_len - 1) // (b + 1) + 1) groups.
- The kernel walks each group's range in chunks [s, s + b) from its start. A chunk runs unmasked when it lies
  inside the range and its window of 2b - 1 offsets (r0 - s - b + 1 .. r0 - s + b - 1) is all slashes
  (decided in the kernel from two loads of the per-head slash prefix sum; then causality holds too); otherwise
  it applies causal & in-range & (slash[i - j] | vertical[j]). Chunk loads start at min(s, L - b) so they stay
  inside the padded K/V; keys before s are masked off.
- Vertical columns inside a visited range are counted by the chunk; the others (at or before the block's
  last row) are gathered in chunks of b as in `vertical_slash_attention`.
Every allowed pair thus lies in exactly one chunk or gathered column, and the masks admit nothing else.
With semantics="cover" the groups are MInference's ranges instead (`_cover_groups`): touching runs merged and
rounded up to whole chunks the way its `convert_vertical_slash_indexes` does, still one list per head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lcjax.numerics import masked_attention
from lcjax.pallas import _common
from lcjax.pallas import _triton_flash as _flash
from lcjax.pallas.vertical_slash_attention import check_slash_mask, run_schedule, vertical_slash_attention_reference
from lcjax.pallas.vertical_slash_index import (
    _sorted_unique,
    compact_columns,
    line_indicators,
    slash_window_mask,
    words_for,
)

__all__ = [
    "VerticalSlashRanges",
    "build_vertical_slash_ranges",
    "vertical_slash_attention_ranges",
    "vertical_slash_attention_reference",
    "range_schedule_tiles",
    "max_groups",
    "cover_mask_fn",
    "vertical_slash_cover_reference",
    "SEMANTICS",
    "range_offsets",
    "columns_in_ranges",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerticalSlashRanges:
    """What `vertical_slash_attention_ranges` runs; nqb = ceil(q_len / block), padded length L = nqb * block.

    group_start, group_end: int32 `[batch, heads, G]`, G = `max_groups(n_slash, q_len, block)`: merged slash
      offset groups [D0, D1] ascending (zero-padded).
    group_counts: int32 `[batch, heads, nqb]`: query block qb uses the first that many groups (D0 <= r0 + b - 1).
    column_indices: int32 `[batch, heads, nqb, max_columns]`, ascending vertical columns outside every range of
      the block and <= its last query; column_counts: int32 `[batch, heads, nqb]`.
    is_vertical, is_slash: int8 `[batch, heads, L]`; slash_prefix: int32 `[batch, heads, L + 1]`, the number of
      slash offsets below each position; slash_next, slash_prev: int32 `[batch, heads, L]`, the first slash
      offset >= / last <= each position (4 L / -4 L if none).
    """

    group_start: jax.Array
    group_end: jax.Array
    group_counts: jax.Array
    column_indices: jax.Array
    column_counts: jax.Array
    is_vertical: jax.Array
    is_slash: jax.Array
    slash_prefix: jax.Array
    slash_next: jax.Array
    slash_prev: jax.Array
    q_len: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))
    semantics: str = dataclasses.field(default="exact", metadata=dict(static=True))


def max_groups(n_slash: int, q_len: int, block: int) -> int:
    """Static bound on a head's merged slash groups (starts are >= block + 1 apart); at least 1."""
    return max(1, min(n_slash, (q_len - 1) // (block + 1) + 1))


def _prefix(x: jax.Array) -> jax.Array:
    """int32 `[..., n + 1]`: sums of x over [0, p)."""
    return jnp.pad(jnp.cumsum(x, axis=-1, dtype=jnp.int32), [(0, 0)] * (x.ndim - 1) + [(1, 0)])


def _list_positions(selected: jax.Array, size: int) -> jax.Array:
    """Positions of the True entries of bool `[batch, heads, n]`, ascending, in `size` slots (zero-padded)."""
    batch, heads, n = selected.shape
    slot = jnp.where(selected, jnp.cumsum(selected, axis=-1, dtype=jnp.int32) - 1, size)
    bi = jnp.arange(batch)[:, None, None]
    hi = jnp.arange(heads)[None, :, None]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), selected.shape)
    return jnp.zeros((batch, heads, size), jnp.int32).at[bi, hi, slot].set(pos, mode="drop")


def _cover_groups(group_start: jax.Array, group_end: jax.Array, n_groups: jax.Array, b: int):
    """MInference's range merge (`convert_vertical_slash_indexes`) over the touching groups [D0, D1] (int32
    `[batch, heads, G]` ascending, the first `n_groups` `[batch, heads]` real): (D0', D1, count), the merged
    ranges [r0 - D1, r0 + b - 1 - D0'] ascending by offset, D0' possibly negative (keys after the block's last
    row, causally masked), each a whole number of b-key chunks from its start.

    MInference walks a block's slash windows [r0 - d, r0 - d + b) by descending d, keeping a range [S, E)
    whose length is a multiple of b: a window inside it changes nothing, one that starts at or before E
    extends E by b, a later one starts a new range. Within a touching group every window starts at or before
    E, so E ends as S rounded up past the group's last window end M in steps of b; whether the next group
    (first window at S') joins depends only on the phase S mod b: it does iff no key x in [M, S') has
    x = S (mod b). So each gap between groups is a map on the b phases (keep, or restart at S' mod b), and an
    associative scan of their compositions gives every group's phase without a sequential walk. The merge
    does not depend on r0 (all windows move with the block), so one list per head serves every block."""
    size = group_start.shape[-1]
    k = jnp.arange(size, dtype=jnp.int32)
    # key order (ascending window start = descending offset): slot k holds group n - 1 - k
    src = n_groups[..., None] - 1 - k
    valid = src >= 0
    take = lambda x: jnp.take_along_axis(x, jnp.maximum(src, 0), axis=-1)
    win_start, win_end = -take(group_end), b - take(group_start)  # relative to r0: [S, M)
    phase0 = jnp.remainder(win_start[..., :1], b)
    if size == 1:
        restart = jnp.zeros_like(valid)
    else:
        phi = jnp.arange(b, dtype=jnp.int32)
        gap = (win_start[..., 1:] - win_end[..., :-1])[..., None]  # [batch, heads, G - 1, 1]
        breaks = (jnp.remainder(phi - win_end[..., :-1, None], b) < gap) & valid[..., 1:, None]
        maps = jnp.where(breaks, jnp.remainder(win_start[..., 1:, None], b), phi)  # phase after each gap
        compose = lambda first, then: jnp.take_along_axis(then, first, axis=-1)
        prefix = jax.lax.associative_scan(compose, maps, axis=-2)
        after = jnp.take_along_axis(prefix, jnp.broadcast_to(phase0[..., None], prefix.shape[:-1] + (1,)), axis=-1)[
            ..., 0
        ]
        phases = jnp.concatenate([phase0, after], axis=-1)  # phase of each group's range
        restart = jnp.take_along_axis(breaks, phases[..., :-1, None], axis=-1)[..., 0]
        restart = jnp.concatenate([jnp.zeros_like(restart[..., :1]), restart], axis=-1)
    starts = valid & (restart | (k == 0))
    anchor = jnp.take_along_axis(win_start, jax.lax.cummax(jnp.where(starts, k, 0), axis=2), axis=-1)
    range_end = anchor + b * ((win_end - anchor + b - 1) // b)
    # a range's last group: the next slot is another range's first, or empty
    last = valid & jnp.concatenate([~valid[..., 1:] | starts[..., 1:], jnp.ones_like(valid[..., :1])], axis=-1)
    count = jnp.sum(starts, axis=-1, dtype=jnp.int32)
    first_keys = jnp.take_along_axis(win_start, _list_positions(starts, size), axis=-1)
    end_keys = jnp.take_along_axis(range_end, _list_positions(last, size), axis=-1)
    # back to ascending offsets: range slot i is merged range count - 1 - i
    back = count[..., None] - 1 - k
    real = back >= 0
    undo = lambda x: jnp.where(real, jnp.take_along_axis(x, jnp.maximum(back, 0), axis=-1), 0)
    return undo(b - end_keys), undo(-first_keys), count


def _blocks_using(group_start: jax.Array, count: jax.Array, nqb: int, b: int) -> jax.Array:
    """int32 `[batch, heads, nqb]`: how many of the (ascending) groups block qb uses, those with
    D0 <= r0 + b - 1 (a range that ends at or after key 0)."""
    first_block = jnp.clip(-(-(group_start - b + 1) // b), 0, nqb)
    first_block = jnp.where(jnp.arange(group_start.shape[-1]) < count[..., None], first_block, nqb)
    hist = jnp.zeros((*count.shape, nqb + 1), jnp.int32)
    bi = jnp.arange(count.shape[0])[:, None, None]
    hi = jnp.arange(count.shape[1])[None, :, None]
    return jnp.cumsum(hist.at[bi, hi, first_block].add(1)[..., :nqb], axis=-1, dtype=jnp.int32)


def _offsets_in_ranges(
    group_start: jax.Array, group_end: jax.Array, count: jax.Array, padded: int, b: int
) -> jax.Array:
    """`range_offsets` from the group lists (the first `count` `[batch, heads]` of each real)."""
    size = padded + 2 * b + 1
    real = jnp.arange(group_start.shape[-1]) < count[..., None]
    # key r0 - u in [r0 - D1, r0 + b - 1 - D0] <=> D0 - b + 1 <= u <= D1
    opens = jnp.where(real, group_start - b + 1 + 2 * b, size)
    closes = jnp.where(real, group_end + 1 + 2 * b, size)
    bi = jnp.arange(count.shape[0])[:, None, None]
    hi = jnp.arange(count.shape[1])[None, :, None]
    delta = (
        jnp.zeros((*count.shape, size), jnp.int32)
        .at[bi, hi, opens]
        .add(1, mode="drop")
        .at[bi, hi, closes]
        .add(-1, mode="drop")
    )
    return (jnp.cumsum(delta, axis=-1) > 0).astype(jnp.int8)


def range_offsets(index: VerticalSlashRanges) -> jax.Array:
    """int8 `[batch, heads, L + 2 block + 1]`: entry 2 block + u is 1 iff key r0 - u lies in one of block r0's
    group ranges (u = r0 - key, from 1 - 2 block up; the same for every block r0)."""
    return _offsets_in_ranges(
        index.group_start, index.group_end, index.group_counts[..., -1], index.is_slash.shape[-1], index.block
    )


def columns_in_ranges(in_range: jax.Array, columns: jax.Array, r0: jax.Array, b: int) -> jax.Array:
    """bool `[batch, heads, nqb, n]`: whether column columns[..., c] (int32 `[batch, heads, n]`) lies in one of
    the ranges of the block starting at row r0 (int32 `[nqb, 1]`), from `range_offsets`' `in_range`."""
    u = jnp.clip(r0 - columns[:, :, None, :] + 2 * b, 0, in_range.shape[-1] - 1)
    shape = (*columns.shape[:2], r0.shape[0], columns.shape[-1])
    flat = jnp.broadcast_to(u, shape).reshape(*columns.shape[:2], -1)
    return jnp.take_along_axis(in_range, flat, axis=-1).reshape(shape) != 0


@functools.partial(jax.jit, static_argnames=("q_len", "block", "columns", "semantics"))
def build_vertical_slash_ranges(
    vertical_indices: jax.Array,
    slash_offsets: jax.Array,
    q_len: int,
    block: int = 64,
    columns: bool = True,
    semantics: str = "exact",
) -> VerticalSlashRanges:
    """The range schedule for causal prefill of `q_len` tokens (same inputs as `build_vertical_slash_index`:
    `[batch, heads, n]` int32 columns / offsets, any order; duplicates and values outside [0, q_len) dropped).
    columns=False leaves the per-block column lists empty (`column_indices` `[batch, heads, nqb, 0]`): the
    Hopper kernel keeps its own (`build_mgpu_columns`), and they are the costly part of the build.
    semantics "exact": groups are the touching slash runs (ranges end at the last slash's window);
    "cover": MInference's ranges (`_cover_groups`: touching runs merged and rounded up to whole chunks)."""
    b = block
    check_semantics(semantics)
    nqb, padded, is_vertical, is_slash = line_indicators(vertical_indices, slash_offsets, q_len, b)

    # offsets inside a group: between (or on) two consecutive slashes at most b apart
    pos = jnp.arange(padded, dtype=jnp.int32)
    far = 4 * padded
    prev = jax.lax.cummax(jnp.where(is_slash != 0, pos, -far), axis=2)
    nxt = jax.lax.cummin(jnp.where(is_slash != 0, pos, far), axis=2, reverse=True)
    covered = (nxt - prev) <= b
    pad_f = jnp.zeros_like(covered[..., :1])
    starts = covered & ~jnp.concatenate([pad_f, covered[..., :-1]], axis=-1)
    ends = covered & ~jnp.concatenate([covered[..., 1:], pad_f], axis=-1)
    n_groups = max_groups(slash_offsets.shape[-1], q_len, b)
    group_start = _list_positions(starts, n_groups)
    group_end = _list_positions(ends, n_groups)
    last_rows = jnp.arange(nqb, dtype=jnp.int32) * b + b - 1
    group_counts = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)[..., last_rows]
    if semantics == "cover":
        group_start, group_end, count = _cover_groups(group_start, group_end, group_counts[..., -1], b)
        group_counts = _blocks_using(group_start, count, nqb, b)

    lists = dict(
        group_start=group_start,
        group_end=group_end,
        group_counts=group_counts,
        is_vertical=is_vertical,
        is_slash=is_slash,
        slash_prefix=_prefix(is_slash.astype(jnp.int32)),
        slash_next=nxt,
        slash_prev=prev,
        q_len=q_len,
        block=b,
        semantics=semantics,
    )
    if not columns:
        return VerticalSlashRanges(
            column_indices=jnp.zeros((*group_counts.shape, 0), jnp.int32),
            column_counts=jnp.zeros_like(group_counts),
            **lists,
        )
    # vertical column j lies in a range of block qb iff u = r0 - j is one of the ranges' offsets
    verticals = _sorted_unique(vertical_indices.astype(jnp.int32), q_len)  # [batch, heads, n_vertical]
    in_range = _offsets_in_ranges(group_start, group_end, group_counts[..., -1], padded, b)
    r0 = (jnp.arange(nqb, dtype=jnp.int32) * b)[:, None]
    j = verticals[:, :, None, :]  # [batch, heads, 1, n_vertical]
    keep = (j < q_len) & (j <= r0 + b - 1) & ~columns_in_ranges(in_range, verticals, r0, b)
    n_vertical = verticals.shape[-1]
    max_columns = max(b, -(-n_vertical // b) * b)
    return VerticalSlashRanges(
        column_indices=compact_columns(j, keep, max_columns),
        column_counts=jnp.sum(keep, axis=-1, dtype=jnp.int32),
        **lists,
    )


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    start_ref,
    end_ref,
    counts_ref,
    cols_ref,
    vert_ref,
    slash_ref,
    prefix_ref,
    next_ref,
    prev_ref,
    words_ref,
    *out_refs,
    num_q_blocks: int,
    block: int,
    qk_scale: float,
    q_axis: int,
    slash_mask: str,
    semantics: str,
):
    o_ref = out_refs[-1]  # with a poisoned buffer aliased in, its input ref comes first
    qb = num_q_blocks - 1 - pl.program_id(q_axis)  # see _flash.launch_grid
    padded = num_q_blocks * block
    q = q_ref[...]
    lane = jnp.arange(block, dtype=jnp.int32)
    r0 = qb * block
    rows = r0 + lane

    def chunk(c, carry):
        lo, hi, state = carry
        start = lo + c * block
        first = jnp.minimum(start, padded - block)  # the load stays inside the padded K/V
        k, v = k_ref[pl.ds(first, block), :], v_ref[pl.ds(first, block), :]
        keys = first + lane
        offset = rows[:, None] - keys[None, :]  # query - key
        in_range = (keys >= start) & (keys <= hi)
        if semantics == "cover":  # MInference's: every key of the range, causal; compares only, no branch
            return lo, hi, _flash.update(state, q, k, v, qk_scale, (offset >= 0) & in_range[None, :])
        window_hi = r0 - start + block  # exclusive end of the chunk's 2b - 1 offsets
        window_lo = jnp.maximum(window_hi - 2 * block + 1, 0)
        n_slash = prefix_ref[window_hi] - prefix_ref[window_lo]
        plain = (start + block - 1 <= hi) & (n_slash == 2 * block - 1)

        def unmasked(state):
            return _flash.update(state, q, k, v, qk_scale)

        def banded(state):  # slash pairs are first_slash <= offset <= last_slash: compares, no gather
            on_vertical = in_range & (vert_ref[pl.ds(first, block)] != 0)
            mask = ((offset >= first_slash) & (offset <= last_slash) & in_range[None, :]) | (
                (offset >= 0) & on_vertical[None, :]
            )
            return _flash.update(state, q, k, v, qk_scale, mask)

        def exact(state, on_slash):  # the exact mask, given each pair's slash test
            on_vertical = vert_ref[pl.ds(first, block)] != 0
            mask = (offset >= 0) & in_range[None, :] & (on_slash | on_vertical[None, :])
            return _flash.update(state, q, k, v, qk_scale, mask)

        def masked(state):
            return exact(state, slash_ref[jnp.maximum(offset, 0)] != 0)

        def bits(state):  # the window's offsets are base + [0, 2b - 1); keys before start are out of range
            base = window_hi - 2 * block + 1
            return exact(state, slash_window_mask(words_ref, base, offset - base, block))

        if slash_mask == "bits":  # two branches: unmasked, or the mask from the window's bits
            return lo, hi, jax.lax.switch(1 - plain.astype(jnp.int32), (unmasked, bits), state)
        first_slash, last_slash = next_ref[window_lo], prev_ref[window_hi - 1]
        band = (last_slash - first_slash + 1 == n_slash) | (n_slash == 0)  # the window's slashes are one run
        # 0 unmasked, 1 band, 2 gather; int32 arithmetic (a jnp.where of Python ints lowers to i1 in Triton)
        branch = 2 - 2 * plain.astype(jnp.int32) - (band & ~plain).astype(jnp.int32)
        return lo, hi, jax.lax.switch(branch, (unmasked, banded, masked), state)

    def whole_chunk(c, carry):  # inside the range and below the block's first row: no mask
        lo, hi, state = carry
        start = lo + c * block
        k, v = k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]
        return lo, hi, _flash.update(state, q, k, v, qk_scale)

    def group(n, state):
        lo = jnp.maximum(r0 - end_ref[n], 0)
        hi = r0 + block - 1 - start_ref[n]
        n_chunks = jax.lax.div(hi - lo + block, block)
        first_masked = 0
        if semantics == "cover":  # the leading chunks that end at or before min(hi, r0) need no mask; two
            # branch-free loops let Triton pipeline both (a per-chunk branch would not)
            first_masked = jnp.maximum(jax.lax.div(jnp.minimum(hi, r0) - lo + 1, block), 0)
            state = jax.lax.fori_loop(0, first_masked, whole_chunk, (lo, hi, state))[2]
        return jax.lax.fori_loop(first_masked, n_chunks, chunk, (lo, hi, state))[2]

    state = _flash.init_state(block, q.shape[-1])
    state = jax.lax.fori_loop(0, counts_ref[0], group, state)
    state = _flash.gather_columns(state, q, k_ref, v_ref, cols_ref, counts_ref[1], rows, block, qk_scale)
    o_ref[...] = _flash.finish(state, o_ref.dtype)


def _pallas_forward(
    q,
    k,
    v,
    index: VerticalSlashRanges,
    *,
    scale: float,
    interpret: bool,
    num_warps: int | None,
    num_stages: int | None,
    heads_fastest: bool = False,
    slash_mask: str = "bits",
    semantics: str = "exact",
    out_init: jax.Array | None = None,
):
    """The kernel on padded arrays: q `[b, L, h, d]`, k, v `[b, L, kvh, d]`, L = nqb * block, d a power of
    two. `out_init` (testing): a buffer of q's shape aliased to the output, to prove every element is written."""
    batch, padded, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    block = index.block
    nqb = padded // block
    counts = jnp.stack([index.group_counts, index.column_counts] + [jnp.zeros_like(index.column_counts)] * 2, axis=-1)
    grid, spec, q_axis = _flash.launch_grid(heads, nqb, batch, heads_fastest)
    kernel = functools.partial(
        _kernel,
        num_q_blocks=nqb,
        block=block,
        qk_scale=scale * _common.LOG2E,
        q_axis=q_axis,
        slash_mask=check_slash_mask(slash_mask),
        semantics=check_semantics(semantics),
    )
    q_spec, kv_spec = _flash.qkv_specs(spec, block, padded, head_dim, groups)
    per_head = lambda n: spec((None, None, n), lambda h, i, b: (b, h, 0))
    per_block = lambda n: spec((None, None, None, n), lambda h, i, b: (b, h, i, 0))
    n_groups = index.group_start.shape[-1]
    words = words_for(index, slash_mask, needed=semantics == "exact")
    in_specs = [
        q_spec,
        kv_spec,
        kv_spec,
        per_head(n_groups),
        per_head(n_groups),
        per_block(4),
        per_block(index.column_indices.shape[-1]),
        per_head(padded),
        per_head(padded),
        per_head(padded + 1),
        per_head(padded),
        per_head(padded),
        per_head(words.shape[-1]),
    ]
    args = [
        q,
        k,
        v,
        index.group_start,
        index.group_end,
        counts,
        index.column_indices,
        index.is_vertical,
        index.is_slash,
        index.slash_prefix,
        index.slash_next,
        index.slash_prev,
        words,
    ]
    return _flash.launch(
        kernel,
        grid=grid,
        in_specs=in_specs,
        args=args,
        out_spec=q_spec,
        out_like=q,
        tile_k=block,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        name="vertical_slash_attention_ranges",
        out_init=out_init,
    )


@functools.partial(
    jax.jit,
    static_argnames=("scale", "interpret", "num_warps", "num_stages", "heads_fastest", "slash_mask", "semantics"),
)
def vertical_slash_attention_ranges(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashRanges,
    *,
    scale: float,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_fastest: bool = False,
    slash_mask: str = "bits",
    semantics: str | None = None,
) -> jax.Array:
    """`vertical_slash_attention` with the range schedule of `build_vertical_slash_ranges` (same shapes, dtypes,
    GQA, head_dims; rows with no allowed key are zeros).

    semantics (default: the index's, which it must match): "exact": the same result as
    `vertical_slash_attention` (the exact vertical-slash mask); then slash_mask "bits": a chunk is unmasked or
    masked from bit words of `index.is_slash`, "gather": unmasked, band (compares) or an `is_slash` gather.
    "cover": MInference's kernel semantics, a superset of exact: query block qb attends, causally, every key of
    MInference's merged ranges [r0 - D1, r0 + block - 1 - D0'] (`cover_mask_fn` is its reference) plus the
    vertical columns.
    """
    if index.column_indices.shape[-1] == 0:
        raise ValueError(
            "vertical_slash_attention_ranges needs an index built with columns=True (this one was "
            "built for the Hopper kernel, without column lists)."
        )
    if semantics is not None and check_semantics(semantics) != index.semantics:
        raise ValueError(
            f"semantics={semantics!r} but the index was built with semantics={index.semantics!r}: "
            f"pass semantics={semantics!r} to build_vertical_slash_ranges."
        )
    return run_schedule(
        "vertical_slash_attention_ranges",
        _pallas_forward,
        q,
        k,
        v,
        index,
        index.group_counts,
        scale=scale,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        heads_fastest=heads_fastest,
        slash_mask=slash_mask,
        semantics=index.semantics,
    )


SEMANTICS = ("exact", "cover")


def check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; choose one of {SEMANTICS}.")
    return semantics


def cover_mask_fn(vertical_indices: jax.Array, slash_offsets: jax.Array, q_len: int, block: int):
    """mask_fn(rows) -> bool `[batch, heads, len(rows), q_len]` of the "cover" semantics, for
    `lcjax.numerics.masked_attention`: query i (block r0 = i // block * block) attends key j <= i iff j is a
    vertical column or lies in one of the block's ranges as MInference's `convert_vertical_slash_indexes`
    merges them (slash windows [r0 - d, r0 - d + block), merged and rounded up to whole chunks; see
    `_cover_groups`). MInference also clamps a window that starts before key 0 to [0, block); here such a
    window keeps its place and loses its negative keys. Entries outside [0, q_len) match nothing."""
    index = build_vertical_slash_ranges(vertical_indices, slash_offsets, q_len, block, columns=False, semantics="cover")
    in_range = range_offsets(index)
    is_vertical = index.is_vertical[..., :q_len]
    keys = jnp.arange(q_len, dtype=jnp.int32)

    def mask_fn(rows):
        r0 = (rows // block * block)[:, None]
        meets = columns_in_ranges(in_range, jnp.broadcast_to(keys, (*in_range.shape[:2], q_len)), r0, block)
        return (keys[None, :] <= rows[:, None]) & (meets | (is_vertical[:, :, None, :] != 0))

    return mask_fn


@functools.partial(jax.jit, static_argnames=("q_len", "block", "scale"))
def vertical_slash_cover_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    vertical_indices: jax.Array,
    slash_offsets: jax.Array,
    q_len: int,
    block: int,
    scale: float,
) -> jax.Array:
    """`vertical_slash_attention_ranges(..., semantics="cover")` in plain XLA (masked softmax attention)."""
    return masked_attention(q, k, v, cover_mask_fn(vertical_indices, slash_offsets, q_len, block), scale, q_chunk=512)


def range_schedule_tiles(index: VerticalSlashRanges) -> dict[str, np.ndarray]:
    """Host-side (numpy) schedule statistics, per (batch, head): `chunks` (range chunks), of them `plain`
    (unmasked) and `band` (masked by compares, no gather; the rest gather from `is_slash`), and `columns`
    (gathered column chunks). Each is one b x b tile-equivalent of work."""
    b, nqb = index.block, index.group_counts.shape[-1]
    counts, prefix = np.asarray(index.group_counts), np.asarray(index.slash_prefix)
    used = max(1, int(counts.max(initial=0)))  # G is a static bound (2017 at 128K, b=64); heads use ~1-100
    d0, d1 = np.asarray(index.group_start)[..., :used], np.asarray(index.group_end)[..., :used]
    nxt, prev = np.asarray(index.slash_next), np.asarray(index.slash_prev)
    r0 = (np.arange(nqb) * b)[:, None]
    out = {name: np.zeros(counts.shape[:2], np.int64) for name in ("chunks", "plain", "band", "columns")}
    out["columns"] = ((np.asarray(index.column_counts) + b - 1) // b).sum(-1)
    for bh in np.ndindex(*counts.shape[:2]):
        valid = np.arange(d0.shape[-1])[None, :] < counts[bh][:, None]  # [nqb, G]
        lo = np.maximum(r0 - d1[bh][None, :], 0)
        hi = r0 + b - 1 - d0[bh][None, :]
        n = np.where(valid, (hi - lo + b) // b, 0)
        out["chunks"][bh] = n.sum()
        for c in range(int(n.max(initial=0))):
            start = lo + c * b
            top = np.clip(r0 - start + b, 0, prefix.shape[-1] - 1)
            bot = np.clip(top - 2 * b + 1, 0, None)
            cnt = prefix[bh][top] - prefix[bh][bot]
            plain = (c < n) & (start + b - 1 <= hi) & (cnt == 2 * b - 1)
            band = (c < n) & ~plain & ((prev[bh][np.maximum(top - 1, 0)] - nxt[bh][bot] + 1 == cnt) | (cnt == 0))
            out["plain"][bh] += plain.sum()
            out["band"][bh] += band.sum()
    return out
