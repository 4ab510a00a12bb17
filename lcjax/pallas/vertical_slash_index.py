"""MInference's vertical-slash pattern turned into the schedule `vertical_slash_attention` runs (plain jnp).

A head's pattern: vertical key columns V and slash offsets S; query i attends key j iff j <= i and
(j in V or i - j in S). Per query block the kernel visits

1. key tiles that hold slash pairs. With square tiles (block_q == block_k == b), whether tile (query block
   qb, key block kb) meets a slash depends only on t = qb - kb: offsets d with |d - t*b| < b cross it. So a
   head's tiles are one sorted list of diagonals t (O(q_len / b) per head, not O((q_len / b)^2)); query block
   qb takes the prefix with t <= qb and computes kb = qb - t. Tiles whose whole window of 2b - 1 offsets is
   slashes (and lie below the diagonal) need no mask ("plain"); the others ("masked") apply the exact mask
   causal & (slash | vertical), so vertical columns inside them are counted there.
2. the vertical columns outside every tile of step 1 (`column_indices`), gathered in chunks of b.

Each allowed (query, key) pair thus lies in exactly one visited tile or column, and the masks admit only
allowed pairs. Out-of-range and duplicate entries of the inputs are dropped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerticalSlashIndex:
    """What the vertical-slash kernel runs; nqb = ceil(q_len / block), padded length L = nqb * block.

    diag_plain, diag_masked: int32 `[batch, heads, nqb]`, ascending tile diagonals t = query block - key block
      (no mask needed / exact mask needed), zero-padded.
    plain_counts, masked_counts: int32 `[batch, heads, nqb]`: query block qb uses the first that many entries
      (those with t <= qb).
    column_indices: int32 `[batch, heads, nqb, max_columns]`, ascending vertical columns not in any visited
      tile and <= the block's last query; max_columns is n_vertical rounded up to a multiple of block.
    column_counts: int32 `[batch, heads, nqb]`.
    is_vertical, is_slash: int8 `[batch, heads, L]`: 1 at the (sanitised) vertical columns / slash offsets.
    """

    diag_plain: jax.Array
    diag_masked: jax.Array
    plain_counts: jax.Array
    masked_counts: jax.Array
    column_indices: jax.Array
    column_counts: jax.Array
    is_vertical: jax.Array
    is_slash: jax.Array
    q_len: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))


def _indicator(x: jax.Array, length: int, padded: int) -> jax.Array:
    """int8 `[batch, heads, padded]` with 1 at the entries of x `[batch, heads, n]` inside [0, length)."""
    batch, heads, _ = x.shape
    x = jnp.where((x >= 0) & (x < length), x, padded)  # negatives would wrap in .at[], so send them away
    b = jnp.arange(batch)[:, None, None]
    h = jnp.arange(heads)[None, :, None]
    return jnp.zeros((batch, heads, padded + 1), jnp.int8).at[b, h, x].set(1)[..., :padded]


def line_indicators(vertical_indices: jax.Array, slash_offsets: jax.Array, q_len: int, block: int):
    """(query blocks, padded length, is_vertical, is_slash): the int8 `[batch, heads, padded]` indicators of
    the sanitised columns and offsets that both vertical-slash schedules start from."""
    if vertical_indices.shape[:2] != slash_offsets.shape[:2]:
        raise ValueError(
            f"vertical_indices {vertical_indices.shape} and slash_offsets {slash_offsets.shape} "
            "must share [batch, heads]."
        )
    nqb = -(-q_len // block)
    padded = nqb * block
    return (
        nqb,
        padded,
        _indicator(vertical_indices.astype(jnp.int32), q_len, padded),
        _indicator(slash_offsets.astype(jnp.int32), q_len, padded),
    )


WORD_BITS = 32


def slash_words(is_slash: jax.Array, block: int) -> jax.Array:
    """int32 `[..., L + 2 * block + 1]` from int8 `is_slash` `[..., L]`: bit t of entry p says whether offset
    p - 2 * block + t is a slash (offsets outside [0, L) are not). `slash_window_mask` reads a tile's window of
    2 * block - 1 offsets from 2 * block / 32 of these words: scalar loads and shifts instead of a
    `[block, block]` gather (an offset window of a tile starts at >= -2 * block + 2 and ends < L)."""
    pad = 2 * block
    x = jnp.pad(is_slash.astype(jnp.int32), [(0, 0)] * (is_slash.ndim - 1) + [(pad, WORD_BITS + 1)])
    n = is_slash.shape[-1] + pad + 1
    words = jnp.zeros(is_slash.shape[:-1] + (n,), jnp.int32)
    for t in range(WORD_BITS):  # int32 wrap-around at bit 31 is what we want: the bit pattern
        words = words | jax.lax.shift_left(x[..., t : t + n], jnp.int32(t))
    return words


def words_for(index, slash_mask: str, needed: bool = True) -> jax.Array:
    """The kernels' slash-word operand: `slash_words(index.is_slash, index.block)` when `slash_mask` is "bits"
    (and `needed`), else a 1-word placeholder (derived per call, so the gather path builds no words)."""
    if slash_mask == "bits" and needed:
        return slash_words(index.is_slash, index.block)
    return jnp.zeros((*index.is_slash.shape[:2], 1), jnp.int32)


def slash_window_mask(words_ref, base: jax.Array, idx: jax.Array, block: int) -> jax.Array:
    """Inside a kernel: bool, idx's shape, whether offset `base + idx` is a slash, for idx in
    [0, 2 * block - 1) (other idx give some bit; callers mask them). `base` is a scalar >= -2 * block."""
    n_words = 2 * block // WORD_BITS
    at = base + 2 * block
    words = [words_ref[at + WORD_BITS * w] for w in range(n_words)]
    which = jax.lax.shift_right_logical(idx, jnp.int32(5))
    word = jnp.full(idx.shape, words[-1], jnp.int32)
    for w in range(n_words - 1):
        word = jnp.where(which == w, words[w], word)
    bit = jax.lax.shift_right_arithmetic(word, idx & (WORD_BITS - 1))
    return (bit & 1) != 0


def compact_columns(columns: jax.Array, keep: jax.Array, max_columns: int) -> jax.Array:
    """int32 `[..., max_columns]`: the entries of `columns` (int32 `[..., n]` ascending, broadcast against
    bool `keep`) where keep holds, in order, zero-padded; max_columns >= n. A sort, not a scatter: a scatter's
    index array takes 16 bytes per entry (4 GiB for 32 heads x 1000 columns at 1M tokens)."""
    big = jnp.iinfo(jnp.int32).max
    listed = jnp.sort(jnp.where(keep, columns, big), axis=-1)
    listed = jnp.pad(listed, [(0, 0)] * (listed.ndim - 1) + [(0, max_columns - listed.shape[-1])], constant_values=big)
    return jnp.where(listed == big, 0, listed)


def _sorted_unique(x: jax.Array, length: int) -> jax.Array:
    """x `[..., n]` sorted, duplicates and entries outside [0, length) replaced by `length` (at the end)."""
    s = jnp.sort(jnp.where((x >= 0) & (x < length), x, length), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(s[..., :1], bool), s[..., 1:] == s[..., :-1]], axis=-1)
    return jnp.sort(jnp.where(dup, length, s), axis=-1)


def _compact(selected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For bool `[..., n]`: the selected positions ascending (zero-padded) and, per prefix, how many."""
    n = selected.shape[-1]
    pos = jnp.arange(n, dtype=jnp.int32)
    listed = jnp.sort(jnp.where(selected, pos, n), axis=-1)
    return jnp.where(listed < n, listed, 0), jnp.cumsum(selected, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("q_len", "block_q", "block_k"))
def build_vertical_slash_index(
    vertical_indices: jax.Array, slash_offsets: jax.Array, q_len: int, block_q: int = 64, block_k: int = 64
) -> VerticalSlashIndex:
    """The kernel's schedule for causal prefill of `q_len` tokens.

    vertical_indices: int32 `[batch, heads, n_vertical]` key columns; slash_offsets: int32
    `[batch, heads, n_slash]` offsets d >= 0 (query i attends key i - d). Any order; duplicates and values
    outside [0, q_len) are dropped. block_q must equal block_k (square tiles make slash coverage depend on
    the tile diagonal only).
    """
    if block_q != block_k:
        raise ValueError(f"build_vertical_slash_index needs square tiles: block_q={block_q} != block_k={block_k}.")
    b = block_q
    nqb, padded, is_vertical, is_slash = line_indicators(vertical_indices, slash_offsets, q_len, b)

    # slashes in each tile diagonal's window [(t-1)b+1, (t+1)b-1], by prefix sums over the offsets
    prefix = jnp.pad(jnp.cumsum(is_slash, axis=-1, dtype=jnp.int32), ((0, 0), (0, 0), (1, 0)))
    t = jnp.arange(nqb, dtype=jnp.int32)
    lo = jnp.clip((t - 1) * b + 1, 0, padded)
    hi = jnp.clip((t + 1) * b, 0, padded)  # exclusive
    in_window = prefix[..., hi] - prefix[..., lo]
    covered = in_window > 0
    plain = covered & (t >= 1) & (in_window == 2 * b - 1)
    diag_plain, plain_counts = _compact(plain)
    diag_masked, masked_counts = _compact(covered & ~plain)

    # vertical columns outside the block's covered tiles (kb <= qb keeps them causal for the block's last row)
    verticals = _sorted_unique(vertical_indices.astype(jnp.int32), q_len)  # [batch, heads, n_vertical]
    qb = t[:, None]
    kb = verticals[:, :, None, :] // b  # [batch, heads, 1, n_vertical]
    diag = jnp.clip(qb - kb, 0, nqb - 1)
    in_tile = jnp.take_along_axis(covered, diag.reshape(*diag.shape[:2], -1), axis=-1).reshape(diag.shape)
    keep = (verticals[:, :, None, :] < q_len) & (kb <= qb) & ~in_tile
    n_vertical = verticals.shape[-1]
    max_columns = max(b, -(-n_vertical // b) * b)
    column_indices = compact_columns(verticals[:, :, None, :], keep, max_columns)
    return VerticalSlashIndex(
        diag_plain=diag_plain,
        diag_masked=diag_masked,
        plain_counts=plain_counts,
        masked_counts=masked_counts,
        column_indices=column_indices,
        column_counts=jnp.sum(keep, axis=-1, dtype=jnp.int32),
        is_vertical=is_vertical,
        is_slash=is_slash,
        q_len=q_len,
        block=b,
    )
