"""Quest page selection for sparse decode (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference"), as pure functions on one layer's KV cache.

Quest splits the cache into pages of `page_size` consecutive slots and keeps, per page, the channel-wise
min and max of its keys. At each decode step the query scores every page by an upper bound of q.k over the
page's keys, sum_c max(q_c * kmin_c, q_c * kmax_c), and attention reads only the top `token_budget /
page_size` pages (the page holding the newest token always among them). The bound reads 2 * head_dim
floats per page instead of page_size * head_dim, so the step's memory traffic shrinks to the bounds plus the
chosen pages.

Layout: k, v `[batch, capacity, kv_heads, head_dim]`, `lengths` int32 `[batch]` valid slots per sequence;
slots >= length hold garbage (anything, NaN included) and are never selected nor attended. Bounds are fp32
`[batch, num_pages, kv_heads, head_dim]`, num_pages = ceil(capacity / page_size). A page with no valid key
has kmin = +inf, kmax = -inf (the identities of min/max, so appends update it by scatter-min/max); its score
is forced to -inf by `num_valid_pages`, never read from the bounds. Every function is jittable with
`page_size`, `token_budget` and `scale` static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.numerics import masked_softmax


def num_valid_pages(lengths: jax.Array, page_size: int) -> jax.Array:
    """Pages holding at least one valid slot: ceil(lengths / page_size), int32 `[batch]`."""
    return (lengths.astype(jnp.int32) + page_size - 1) // page_size


def _num_pages(capacity: int, page_size: int) -> int:
    return -(-capacity // page_size)


def _paged(x: jax.Array, page_size: int, fill: float | None = None) -> jax.Array:
    """`[batch, capacity, ...]` -> `[batch, num_pages, page_size, ...]`. A capacity that is not a multiple of
    page_size is padded (with `fill`, or zeros), which copies the array: allocate caches in whole pages."""
    batch, capacity = x.shape[:2]
    pad = _num_pages(capacity, page_size) * page_size - capacity
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, widths, constant_values=0 if fill is None else fill)
    return x.reshape(batch, -1, page_size, *x.shape[2:])


def page_bounds(
    k: jax.Array, lengths: jax.Array, page_size: int = 16, first: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Channel-wise min and max of each page's valid keys (slots in `[first, lengths)`).

    k: `[batch, capacity, kv_heads, head_dim]`; lengths, first (default 0): int32 `[batch]`. Returns (kmin, kmax), fp32
    `[batch, num_pages, kv_heads, head_dim]`, num_pages = ceil(capacity / page_size) (a ragged last page is
    padded logically). Pages with no valid key get kmin = +inf, kmax = -inf.
    """
    capacity = k.shape[1]
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    valid = slot < lengths[:, None]
    if first is not None:
        valid &= slot >= first[:, None]
    valid = valid[..., None, None]
    kf = k.astype(jnp.float32)
    # Garbage slots become the reduction's identity, so they can never move a bound.
    kmin = _paged(jnp.where(valid, kf, jnp.inf), page_size, jnp.inf).min(axis=2)
    kmax = _paged(jnp.where(valid, kf, -jnp.inf), page_size, -jnp.inf).max(axis=2)
    return kmin, kmax


def update_page_bounds(
    kmin: jax.Array, kmax: jax.Array, k_new: jax.Array, slots: jax.Array, lengths_after: jax.Array, page_size: int = 16
) -> tuple[jax.Array, jax.Array]:
    """Fold newly written keys into the page bounds, touching only their pages (scatter-min/max).

    kmin, kmax: fp32 `[batch, num_pages, kv_heads, head_dim]`; k_new: `[batch, n, kv_heads, head_dim]`
    written at `slots` int32 `[batch, n]`; lengths_after: int32 `[batch]`, the lengths once written. Writes
    at slots >= lengths_after (or past the last page) are ignored, so a batch can pad its writes. Equals
    `page_bounds` recomputed from scratch as long as no written slot was valid before (appends): min/max
    cannot forget an overwritten key, so after a rewind or overwrite recompute with `page_bounds`.
    `page_size` must be the one the bounds were built with (the bounds' shape does not determine it).
    """
    valid = ((slots >= 0) & (slots < lengths_after[:, None]))[..., None, None]
    kf = k_new.astype(jnp.float32)
    rows = jnp.arange(slots.shape[0], dtype=jnp.int32)[:, None]
    # Ignored writes carry the identity and an out-of-range page, dropped by the scatter either way.
    pages = jnp.where(valid[..., 0, 0], slots // page_size, kmin.shape[1])
    kmin = kmin.at[rows, pages].min(jnp.where(valid, kf, jnp.inf), mode="drop")
    kmax = kmax.at[rows, pages].max(jnp.where(valid, kf, -jnp.inf), mode="drop")
    return kmin, kmax


def page_scores(q: jax.Array, kmin: jax.Array, kmax: jax.Array, num_valid_pages: jax.Array) -> jax.Array:
    """Quest's upper bound of q.k over each page's keys, sum_c max(q_c * kmin_c, q_c * kmax_c).

    q: `[batch, heads, head_dim]`, heads a multiple of kv_heads (GQA: head h reads kv head h // group);
    kmin, kmax: `[batch, num_pages, kv_heads, head_dim]`; num_valid_pages: int32 `[batch]`. Returns fp32
    `[batch, kv_heads, num_pages]`, -inf for pages >= num_valid_pages. A group's query heads are reduced by
    max, so the score bounds q.k for every head of the group and the selection is per KV head: one gather
    of K/V serves the whole group. Unscaled (the softmax scale does not change the ranking).
    """
    batch, heads, head_dim = q.shape
    num_pages, kv_heads = kmin.shape[1:3]
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    # max(q*lo, q*hi) = max(q,0)*hi + min(q,0)*lo when lo <= hi: two matmuls, no [.., pages, d] temporary.
    # HIGHEST keeps the bound a bound on GPU/TPU, whose default fp32 matmul rounds inputs to tf32/bf16.
    # (Empty pages hold +-inf and may give NaN here; they are replaced below.)
    hi = jax.lax.Precision.HIGHEST
    scores = (
        jnp.einsum("bkgd,bpkd->bkgp", jnp.maximum(qg, 0), kmax, precision=hi)
        + jnp.einsum("bkgd,bpkd->bkgp", jnp.minimum(qg, 0), kmin, precision=hi)
    ).max(axis=2)
    live = jnp.arange(num_pages, dtype=jnp.int32)[None, :] < num_valid_pages[:, None]
    return jnp.where(live[:, None, :], scores, -jnp.inf)


def budget_pages(token_budget: int, page_size: int, capacity: int) -> int:
    """Static pages per KV head: token_budget // page_size, capped at the cache's page count."""
    if token_budget % page_size or token_budget < page_size:
        # A partial page would make the budget ambiguous (floor breaks "budget >= length is dense").
        raise ValueError(f"token_budget {token_budget} must be a positive multiple of page_size {page_size}")
    return min(token_budget // page_size, _num_pages(capacity, page_size))


def select_pages(
    scores: jax.Array, token_budget: int, page_size: int, lengths: jax.Array, first: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Top-scoring pages per KV head, always including the page of the newest token.

    scores: `[batch, kv_heads, num_pages]` (from `page_scores`); lengths, first (default 0): int32 `[batch]`, the
    valid slots are `[first, lengths)` (pages wholly before `first` are never chosen). Returns (pages,
    valid): int32 and bool `[batch, kv_heads, budget_pages]`, budget_pages = min(token_budget // page_size,
    num_pages) (static; token_budget must be a multiple of page_size). Entries are distinct pages, the
    newest token's page first; `valid` is False for the entries beyond a sequence's valid pages (their
    indices are in range but meaningless). Pages past the length are never valid, whatever their score.
    """
    num_pages = scores.shape[-1]
    k = budget_pages(token_budget, page_size, num_pages * page_size)
    page = jnp.arange(num_pages, dtype=jnp.int32)[None, :]
    live = page < num_valid_pages(lengths, page_size)[:, None]
    if first is not None:
        live &= page >= (first // page_size)[:, None]
    live = live[:, None, :]
    # Quest always keeps the current page; +inf puts it first (it is live whenever length > 0).
    current = (page == (lengths[:, None] - 1) // page_size)[:, None, :]
    scores = jnp.where(live, jnp.where(current, jnp.inf, scores.astype(jnp.float32)), -jnp.inf)
    top, pages = jax.lax.top_k(scores, k)
    return pages.astype(jnp.int32), top > -jnp.inf


def quest_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    kmin: jax.Array,
    kmax: jax.Array,
    *,
    scale: float,
    token_budget: int,
    page_size: int = 16,
    first: jax.Array | None = None,
) -> jax.Array:
    """One decode step of attention over the Quest-selected pages of each KV head.

    q: `[batch, heads, head_dim]`; k, v: `[batch, capacity, kv_heads, head_dim]`; lengths: int32 `[batch]`
    (the new token's key already written, so it is slot length-1); kmin, kmax from `page_bounds` /
    `update_page_bounds`; first: optional int32 `[batch]`, slots before it are not attended (a compressed
    layer's). Returns `[batch, heads, head_dim]` in q's dtype. Only the selected pages' K/V are
    gathered (budget_pages * page_size slots per KV head, no dense score over the capacity); logits and
    softmax are fp32 over the gathered slots < length; GQA groups queries per KV head instead of repeating
    K/V. With token_budget >= length every valid page is selected and this is dense attention. A sequence
    of length 0 gives zeros. A capacity that is not a multiple of page_size costs a padded copy of K and V.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scores = page_scores(q, kmin, kmax, num_valid_pages(lengths, page_size))
    pages, valid = select_pages(scores, token_budget, page_size, lengths, first)
    n_sel = pages.shape[-1]

    # [batch, sel, 1, kv_heads, 1] indices into the [batch, pages, page_size, kv_heads, d] view.
    idx = pages.transpose(0, 2, 1)[:, :, None, :, None]
    kg = jnp.take_along_axis(_paged(k, page_size), idx, axis=1).reshape(batch, -1, kv_heads, head_dim)
    vg = jnp.take_along_axis(_paged(v, page_size), idx, axis=1).reshape(batch, -1, kv_heads, head_dim)
    slot = pages[..., None] * page_size + jnp.arange(page_size, dtype=jnp.int32)  # [b, kvh, sel, page_size]
    in_range = slot < lengths[:, None, None, None]
    if first is not None:
        in_range &= slot >= first[:, None, None, None]
    mask = (valid[..., None] & in_range).reshape(batch, kv_heads, n_sel * page_size)

    qg = q.reshape(batch, kv_heads, groups, head_dim)
    logits = jnp.einsum("bkgd,btkd->bkgt", qg, kg, preferred_element_type=jnp.float32) * scale
    probs = masked_softmax(logits, mask[:, :, None, :])
    # Zero masked values too: a zero weight times garbage (inf/NaN) would still poison the sum.
    vg = jnp.where(mask.transpose(0, 2, 1)[..., None], vg, 0)
    out = jnp.einsum("bkgt,btkd->bkgd", probs.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
