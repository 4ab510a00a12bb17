"""vertical_slash_attention (Pallas: interpret mode on CPU, compiled on a GPU) and its index builder, against
float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import INTERPRET, TOL, assert_matches_reference, attention_f64, cover_mask

from lcjax.pallas.vertical_slash_attention import (
    SLASH_MASKS,
    _pallas_forward,
    build_vertical_slash_index,
    vertical_slash_attention,
    vertical_slash_attention_reference,
)
from lcjax.pallas.vertical_slash_index import slash_words


def pattern_mask(verticals, slashes, q_len):
    """numpy: key <= query and (key in verticals or query - key in slashes), per (batch, head)."""
    verticals, slashes = np.asarray(verticals), np.asarray(slashes)
    batch, heads = verticals.shape[:2]
    mask = np.zeros((batch, heads, q_len, q_len), bool)
    for b in range(batch):
        for h in range(heads):
            for c in verticals[b, h]:
                if 0 <= c < q_len:
                    mask[b, h, c:, c] = True
            for d in slashes[b, h]:
                if 0 <= d < q_len:
                    mask[b, h, np.arange(d, q_len), np.arange(0, q_len - d)] = True
    return mask


def visit_counts(index, q_len):
    """How many times the kernel's schedule counts each (query, key) pair, by replaying its three loops."""
    ix = {
        f: np.asarray(getattr(index, f))
        for f in (
            "diag_plain",
            "diag_masked",
            "plain_counts",
            "masked_counts",
            "column_indices",
            "column_counts",
            "is_vertical",
            "is_slash",
        )
    }
    b_ = index.block
    batch, heads, nqb = ix["plain_counts"].shape
    padded = nqb * b_
    seen = np.zeros((batch, heads, padded, padded), np.int32)
    r, c = np.arange(b_)[:, None], np.arange(b_)[None, :]
    for b in range(batch):
        for h in range(heads):
            for qb in range(nqb):
                rows = slice(qb * b_, (qb + 1) * b_)
                for t in ix["diag_plain"][b, h, : ix["plain_counts"][b, h, qb]]:
                    seen[b, h, rows, (qb - t) * b_ : (qb - t + 1) * b_] += 1
                for t in ix["diag_masked"][b, h, : ix["masked_counts"][b, h, qb]]:
                    off = t * b_ + r - c
                    ks = (qb - t) * b_
                    m = (off >= 0) & (
                        (ix["is_slash"][b, h][np.maximum(off, 0)] != 0)
                        | (ix["is_vertical"][b, h, ks : ks + b_] != 0)[None, :]
                    )
                    seen[b, h, rows, ks : ks + b_] += m
                for col in ix["column_indices"][b, h, qb, : ix["column_counts"][b, h, qb]]:
                    seen[b, h, rows, col] += np.arange(qb * b_, (qb + 1) * b_) >= col
    return seen[:, :, :q_len, :q_len]


def random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype, batch=1):
    def draw(h):
        return jnp.asarray(rng.standard_normal((batch, q_len, h, head_dim)) * 1.5, jnp.float32).astype(dtype)

    return draw(heads), draw(kv_heads), draw(kv_heads)


def random_pattern(rng, batch, heads, q_len, n_vertical, n_slash):
    """Random columns and offsets with duplicates and out-of-range values mixed in."""
    v = rng.integers(-3, q_len + 3, (batch, heads, n_vertical))
    s = rng.integers(-3, q_len + 3, (batch, heads, n_slash))
    if n_vertical > 1:
        v[..., 1] = v[..., 0]
    if n_slash > 1:
        s[..., 1] = s[..., 0]
    return jnp.asarray(v, jnp.int32), jnp.asarray(s, jnp.int32)


def nearest_diagonals(batch, heads, n_vertical, n_slash):
    """MInference's ideal case: the first columns and the nearest diagonals."""
    v = np.broadcast_to(np.arange(n_vertical), (batch, heads, n_vertical))
    s = np.broadcast_to(np.arange(n_slash), (batch, heads, n_slash))
    return jnp.asarray(v, jnp.int32), jnp.asarray(s, jnp.int32)


CASES = [  # q_len, heads, kv_heads, head_dim, dtype, block, n_vertical, n_slash, pattern
    (100, 4, 4, 64, jnp.float32, 16, 9, 7, "random"),
    (200, 8, 1, 128, jnp.bfloat16, 32, 20, 12, "random"),
    (170, 8, 2, 64, jnp.bfloat16, 16, 5, 70, "nearest"),
    (130, 4, 1, 64, jnp.float32, 32, 0, 6, "random"),
    (120, 4, 2, 128, jnp.float32, 16, 12, 0, "random"),
    (300, 4, 2, 64, jnp.float32, 64, 10, 120, "random"),  # 64-wide tiles: 4 slash words per window
]


@pytest.mark.parametrize("slash_mask", SLASH_MASKS)
@pytest.mark.parametrize("q_len,heads,kv_heads,head_dim,dtype,block,n_vertical,n_slash,pattern", CASES)
def test_vertical_slash_matches_float64_reference(
    q_len, heads, kv_heads, head_dim, dtype, block, n_vertical, n_slash, pattern, slash_mask
):
    rng = np.random.default_rng(q_len * 7 + heads)
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype)
    if pattern == "random":
        verticals, slashes = random_pattern(rng, 1, heads, q_len, n_vertical, n_slash)
    else:
        verticals, slashes = nearest_diagonals(1, heads, n_vertical, n_slash)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    scale = head_dim**-0.5
    out = vertical_slash_attention(q, k, v, index, scale=scale, interpret=INTERPRET, slash_mask=slash_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = pattern_mask(verticals, slashes, q_len)
    ref = attention_f64(q, k, v, mask, scale)
    assert_matches_reference(out, ref, mask, dtype)


@pytest.mark.parametrize("heads_fastest", [True, False])
def test_vertical_slash_kernel_writes_every_output_element(heads_fastest):
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 96, 4, 2, 64, jnp.bfloat16)
    verticals, slashes = random_pattern(rng, 1, 4, 96, 6, 5)
    index = build_vertical_slash_index(verticals, slashes, 96, 32, 32)
    poison = jnp.full(q.shape, jnp.nan, q.dtype)
    out = _pallas_forward(
        q,
        k,
        v,
        index,
        scale=0.125,
        interpret=INTERPRET,
        num_warps=None,
        num_stages=None,
        heads_fastest=heads_fastest,
        out_init=poison,
    )
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = attention_f64(q, k, v, pattern_mask(verticals, slashes, 96), 0.125)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("pattern", ["random", "nearest", "dense_slashes"])
def test_index_counts_every_allowed_pair_exactly_once(pattern):
    rng = np.random.default_rng(6)
    q_len, block = 150, 16
    if pattern == "random":
        verticals, slashes = random_pattern(rng, 2, 3, q_len, 25, 20)
    elif pattern == "nearest":
        verticals, slashes = nearest_diagonals(2, 3, 10, 60)
    else:  # every offset a slash: all tiles below the diagonal are plain
        verticals, slashes = nearest_diagonals(2, 3, 4, q_len)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    np.testing.assert_array_equal(visit_counts(index, q_len), pattern_mask(verticals, slashes, q_len))
    if pattern != "random":
        assert np.asarray(index.plain_counts).max() > 0  # the unmasked path is exercised


def test_index_planted_vertical_line_and_diagonal():
    q_len, block = 128, 16
    verticals = jnp.asarray([[[40, 40, -1, 500]]], jnp.int32)  # one column, a duplicate, two out of range
    slashes = jnp.asarray([[[20]]], jnp.int32)
    index = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    seen = visit_counts(index, q_len)[0, 0]
    line = np.zeros((q_len, q_len), np.int32)
    line[40:, 40] = 1
    line[np.arange(20, q_len), np.arange(q_len - 20)] = 1
    np.testing.assert_array_equal(seen, line)
    # offset 20 crosses tile diagonals t = 1 and 2 only; column 40 is inside a slash tile for query block 3
    # (keys 32..47 at t = 1) and 4 (t = 2), a gathered column for the query blocks 2 and 5..7
    assert list(np.asarray(index.diag_masked)[0, 0, :2]) == [1, 2]
    assert list(np.asarray(index.column_counts)[0, 0]) == [0, 0, 1, 0, 0, 1, 1, 1]
    assert int(np.asarray(index.plain_counts).max()) == 0


@pytest.mark.parametrize("block", [16, 64])
def test_slash_words_hold_each_offsets_bit(block):
    rng = np.random.default_rng(112)
    length = 203
    is_slash = rng.integers(0, 2, (2, 3, length)).astype(np.int8)
    words = np.asarray(slash_words(jnp.asarray(is_slash), block)).view(np.uint32)
    assert words.shape == (2, 3, length + 2 * block + 1)
    for p in range(words.shape[-1]):
        for t in range(32):
            offset = p - 2 * block + t
            want = is_slash[..., offset] if 0 <= offset < length else 0
            np.testing.assert_array_equal((words[..., p] >> np.uint32(t)) & 1, want)


def test_vertical_slash_xla_reference_matches_float64():
    rng = np.random.default_rng(7)
    q, k, v = random_inputs(rng, 90, 4, 2, 64, jnp.float32)
    verticals, slashes = random_pattern(rng, 1, 4, 90, 8, 8)
    out = vertical_slash_attention_reference(q, k, v, verticals, slashes, 0.125)
    ref = attention_f64(q, k, v, pattern_mask(verticals, slashes, 90), 0.125)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_vertical_slash_rejects_rectangular_tiles_and_mismatched_index():
    v = jnp.zeros((1, 2, 3), jnp.int32)
    with pytest.raises(ValueError, match="square tiles"):
        build_vertical_slash_index(v, v, 64, 32, 16)
    q = jnp.ones((1, 64, 2, 64), jnp.float32)
    index = build_vertical_slash_index(v, v, 32, 16, 16)
    with pytest.raises(ValueError, match="must agree"):
        vertical_slash_attention(q, q, q, index, scale=1.0, interpret=INTERPRET)


# --- range schedule (lcjax/pallas/vertical_slash_ranges.py) ---------------------------------------------------

from lcjax.pallas import vertical_slash_ranges as vsr  # noqa: E402


def run_pattern(rng, batch, heads, q_len, n_runs, n_nearest=20, widths=(10, 40)):
    """MInference-like estimated slashes: the nearest offsets plus scattered runs of consecutive offsets, and a
    few random verticals. Padded to one length with -1 (dropped by the builders)."""
    per_head = []
    for _ in range(batch * heads):
        offs = [np.arange(n_nearest)]
        for _ in range(n_runs):
            w = int(rng.integers(*widths, endpoint=True))
            d0 = int(rng.integers(0, max(1, q_len - w)))
            offs.append(np.arange(d0, d0 + w))
        per_head.append(np.unique(np.concatenate(offs)))
    width = max(len(o) for o in per_head)
    s = np.full((batch * heads, width), -1)
    for i, o in enumerate(per_head):
        s[i, : len(o)] = o
    v = rng.integers(0, q_len, (batch, heads, 6))
    return jnp.asarray(v, jnp.int32), jnp.asarray(s.reshape(batch, heads, width), jnp.int32)


def range_visit_counts(index, q_len):
    """How many times the range schedule counts each (query, key) pair, replaying the kernel's loops (chunk
    starts, load clamping, plain/masked decision and masks as the kernel computes them)."""
    ix = {
        f.name: np.asarray(getattr(index, f.name))
        for f in vsr.dataclasses.fields(index)
        if f.name not in ("q_len", "block")
    }
    b_ = index.block
    batch, heads, nqb = ix["group_counts"].shape
    padded = nqb * b_
    seen = np.zeros((batch, heads, padded, padded), np.int32)
    lane = np.arange(b_)
    n_plain = n_band = 0
    for b in range(batch):
        for h in range(heads):
            prefix, is_slash, is_vert = ix["slash_prefix"][b, h], ix["is_slash"][b, h], ix["is_vertical"][b, h]
            nxt, prev = ix["slash_next"][b, h], ix["slash_prev"][b, h]
            for qb in range(nqb):
                r0 = qb * b_
                rows = r0 + lane
                for n in range(ix["group_counts"][b, h, qb]):
                    lo = max(r0 - ix["group_end"][b, h, n], 0)
                    hi = r0 + b_ - 1 - ix["group_start"][b, h, n]
                    for c in range((hi - lo + b_) // b_):
                        start = lo + c * b_
                        first = min(start, padded - b_)
                        top = r0 - start + b_
                        bot = max(top - 2 * b_ + 1, 0)
                        keys = first + lane
                        off = rows[:, None] - keys[None, :]
                        in_range = ((keys >= start) & (keys <= hi))[None, :]
                        cnt = prefix[top] - prefix[bot]
                        a, c_ = nxt[bot], prev[top - 1]
                        if start + b_ - 1 <= hi and cnt == 2 * b_ - 1:
                            m = np.ones((b_, b_), np.int32)
                            n_plain += 1
                        elif c_ - a + 1 == cnt or cnt == 0:
                            m = in_range & (((off >= a) & (off <= c_)) | ((off >= 0) & (is_vert[keys] != 0)[None, :]))
                            n_band += 1
                        else:
                            m = (
                                (off >= 0)
                                & in_range
                                & ((is_slash[np.maximum(off, 0)] != 0) | (is_vert[keys] != 0)[None, :])
                            )
                        seen[b, h, r0 : r0 + b_, first : first + b_] += m
                for col in ix["column_indices"][b, h, qb, : ix["column_counts"][b, h, qb]]:
                    seen[b, h, r0 : r0 + b_, col] += rows >= col
    return seen[:, :, :q_len, :q_len], (n_plain, n_band)


RANGE_CASES = [  # q_len, heads, kv_heads, head_dim, dtype, block, pattern
    (100, 4, 4, 64, jnp.float32, 16, "random"),
    (200, 8, 2, 128, jnp.bfloat16, 16, "runs"),
    (230, 4, 1, 64, jnp.float32, 16, "runs"),
    (170, 8, 2, 64, jnp.bfloat16, 16, "nearest"),
    (130, 4, 1, 128, jnp.float32, 32, "no_verticals"),
    (120, 4, 4, 64, jnp.bfloat16, 16, "no_slashes"),
    (330, 4, 2, 64, jnp.float32, 64, "runs"),  # 64-key chunks: 4 slash words per window
]


def range_case_pattern(rng, pattern, heads, q_len):
    if pattern == "random":
        return random_pattern(rng, 1, heads, q_len, 9, 12)
    if pattern == "runs":
        return run_pattern(rng, 1, heads, q_len, n_runs=4)
    if pattern == "nearest":
        return nearest_diagonals(1, heads, 5, 70)
    if pattern == "no_verticals":  # runs only, none below offset 5: the first rows have no allowed key
        slashes = run_pattern(rng, 1, heads, q_len, n_runs=3, n_nearest=0)[1]
        return jnp.zeros((1, heads, 0), jnp.int32), jnp.where(slashes < 5, -1, slashes)
    return random_pattern(rng, 1, heads, q_len, 12, 0)


@pytest.mark.parametrize("slash_mask", SLASH_MASKS)
@pytest.mark.parametrize("q_len,heads,kv_heads,head_dim,dtype,block,pattern", RANGE_CASES)
def test_vertical_slash_ranges_matches_float64_reference(
    q_len, heads, kv_heads, head_dim, dtype, block, pattern, slash_mask
):
    rng = np.random.default_rng(113)
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype)
    verticals, slashes = range_case_pattern(rng, pattern, heads, q_len)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block)
    scale = head_dim**-0.5
    out = vsr.vertical_slash_attention_ranges(q, k, v, index, scale=scale, interpret=INTERPRET, slash_mask=slash_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = pattern_mask(verticals, slashes, q_len)
    ref = attention_f64(q, k, v, mask, scale)
    empty = assert_matches_reference(out, ref, mask, dtype)  # includes: rows with no allowed key exactly zero
    if pattern in ("no_verticals", "no_slashes"):
        assert empty.any()


def test_vertical_slash_ranges_writes_every_output_element():
    rng = np.random.default_rng(114)
    q, k, v = random_inputs(rng, 96, 4, 2, 64, jnp.bfloat16)
    verticals, slashes = run_pattern(rng, 1, 4, 96, n_runs=3, n_nearest=5)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, 96, 32)
    poison = jnp.full(q.shape, jnp.nan, q.dtype)
    out = vsr._pallas_forward(
        q, k, v, index, scale=0.125, interpret=INTERPRET, num_warps=None, num_stages=None, out_init=poison
    )
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = attention_f64(q, k, v, pattern_mask(verticals, slashes, 96), 0.125)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("pattern", ["random", "runs", "nearest", "dense_slashes", "ragged_runs"])
def test_range_index_counts_every_allowed_pair_exactly_once(pattern):
    rng = np.random.default_rng(115)
    q_len, block = 150, 16
    if pattern == "random":
        verticals, slashes = random_pattern(rng, 2, 3, q_len, 25, 20)
    elif pattern == "runs":
        verticals, slashes = run_pattern(rng, 2, 3, q_len, n_runs=4)
    elif pattern == "ragged_runs":  # q_len not a multiple of the block: chunk loads clamp at the padded end
        q_len = 141
        verticals, slashes = run_pattern(rng, 2, 3, q_len, n_runs=3, widths=(20, 60))
    elif pattern == "nearest":
        verticals, slashes = nearest_diagonals(2, 3, 10, 60)
    else:
        verticals, slashes = nearest_diagonals(2, 3, 4, q_len)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block)
    seen, (n_plain, n_band) = range_visit_counts(index, q_len)
    np.testing.assert_array_equal(seen, pattern_mask(verticals, slashes, q_len))
    if pattern in ("nearest", "dense_slashes"):
        assert n_plain > 0  # the unmasked path is exercised
    if pattern in ("runs", "ragged_runs"):
        assert n_band > 0  # the compare-masked path is exercised
    # the host-side statistics replay the same schedule
    stats = vsr.range_schedule_tiles(index)
    assert (int(stats["plain"].sum()), int(stats["band"].sum())) == (n_plain, n_band)


def test_range_index_groups_runs_and_bounds():
    q_len, block = 200, 16
    # runs [0, 9], [20, 29] (gap 11 <= 16: one group), [100, 139], and a lone offset 199; column 5 and 150
    slashes = jnp.asarray([[[*range(10), *range(20, 30), *range(100, 140), 199, -4, 250]]], jnp.int32)
    verticals = jnp.asarray([[[5, 150, 150, -1]]], jnp.int32)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block)
    assert index.group_start.shape[-1] == vsr.max_groups(slashes.shape[-1], q_len, block)
    assert list(np.asarray(index.group_start)[0, 0, :3]) == [0, 100, 199]
    assert list(np.asarray(index.group_end)[0, 0, :3]) == [29, 139, 199]
    # query block qb uses the groups with D0 <= 16 qb + 15
    assert list(np.asarray(index.group_counts)[0, 0]) == [1] * 6 + [2] * 6 + [3]
    seen, _ = range_visit_counts(index, q_len)
    np.testing.assert_array_equal(seen, pattern_mask(verticals, slashes, q_len))


def test_range_schedule_visits_fewer_tiles_on_runs():
    """On scattered runs of slashes the range schedule computes fewer b x b tile-equivalents than the
    diagonal-tile schedule, and most of its chunks need no gathered mask."""
    rng = np.random.default_rng(11)
    q_len, block = 2048, 32
    verticals, slashes = run_pattern(rng, 1, 2, q_len, n_runs=10, n_nearest=128, widths=(64, 64))
    diag = build_vertical_slash_index(verticals, slashes, q_len, block, block)
    ranges = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block)
    diag_tiles = int(
        np.asarray(diag.plain_counts + diag.masked_counts).sum()
        + ((np.asarray(diag.column_counts) + block - 1) // block).sum()
    )
    stats = vsr.range_schedule_tiles(ranges)
    range_tiles = int(stats["chunks"].sum() + stats["columns"].sum())
    assert range_tiles < diag_tiles
    assert stats["plain"].sum() + stats["band"].sum() > 0.8 * stats["chunks"].sum()


@pytest.mark.parametrize("q_len,heads,kv_heads,head_dim,dtype,block,pattern", RANGE_CASES)
def test_vertical_slash_ranges_cover_semantics_matches_float64_reference(
    q_len, heads, kv_heads, head_dim, dtype, block, pattern
):
    rng = np.random.default_rng(116)
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, head_dim, dtype)
    verticals, slashes = range_case_pattern(rng, pattern, heads, q_len)
    mask = cover_mask(verticals, slashes, q_len, block)
    assert (mask >= pattern_mask(verticals, slashes, q_len)).all()  # a superset of the exact pattern
    index = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block, semantics="cover")
    scale = head_dim**-0.5
    out = vsr.vertical_slash_attention_ranges(q, k, v, index, scale=scale, interpret=INTERPRET)
    assert_matches_reference(out, attention_f64(q, k, v, mask, scale), mask, dtype)
    fn_mask = np.asarray(vsr.cover_mask_fn(verticals, slashes, q_len, block)(jnp.arange(q_len)))
    np.testing.assert_array_equal(fn_mask, mask)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = vsr.vertical_slash_cover_reference(*up, verticals, slashes, q_len=q_len, block=block, scale=scale)
    np.testing.assert_allclose(np.asarray(ref), attention_f64(q, k, v, mask, scale), rtol=2e-3, atol=2e-4)


def test_calls_past_the_int32_offset_limit_run_in_kv_head_groups(monkeypatch):
    """At 1M tokens x 32 heads q has 2^32 elements, past Triton's int32 offsets: the wrappers then split the
    call by whole KV-head groups. Forced here with a small limit; the result must not change."""
    from lcjax.pallas import _common

    rng = np.random.default_rng(117)
    q_len, heads, kv_heads = 72, 8, 4
    q, k, v = random_inputs(rng, q_len, heads, kv_heads, 64, jnp.float32)
    verticals, slashes = random_pattern(rng, 1, heads, q_len, 5, 9)
    mask = pattern_mask(verticals, slashes, q_len)
    index = build_vertical_slash_index(verticals, slashes, q_len, 16, 16)
    ranges = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, 16)
    monkeypatch.setattr(_common, "MAX_KERNEL_ELEMENTS", 80 * 2 * 64 + 1)  # one KV group (2 q heads) per call
    calls = []
    real = vsr._pallas_forward
    monkeypatch.setattr(vsr, "_pallas_forward", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    out = vertical_slash_attention(q, k, v, index, scale=0.125, interpret=INTERPRET)
    out_r = vsr.vertical_slash_attention_ranges(q, k, v, ranges, scale=0.125, interpret=INTERPRET)
    assert calls == [(1, 80, 2, 64)] * kv_heads
    ref = attention_f64(q, k, v, mask, 0.125)
    assert_matches_reference(out, ref, mask, jnp.float32)
    assert_matches_reference(out_r, ref, mask, jnp.float32)


COVER_PATTERNS = ["random", "runs", "spaced_65", "spaced_70", "dense", "far_only"]


def cover_case(rng, pattern, q_len, block):
    if pattern == "random":
        return random_pattern(rng, 2, 3, q_len, 7, 40)
    if pattern == "runs":
        return run_pattern(rng, 2, 3, q_len, n_runs=5, widths=(3, 40))
    if pattern.startswith("spaced_"):  # one range per slash or one chain, decided by each gap's phase
        step = int(pattern.split("_")[1]) * block // 64
        offsets = np.arange(int(rng.integers(0, step)), q_len, step)
        return (
            jnp.zeros((2, 3, 1), jnp.int32) - 1,
            jnp.broadcast_to(jnp.asarray(offsets, jnp.int32), (2, 3, offsets.size)),
        )
    if pattern == "dense":
        return nearest_diagonals(2, 3, 4, q_len)
    far = rng.integers(q_len // 2, q_len, (2, 3, 6))  # only slashes far from the diagonal
    return jnp.zeros((2, 3, 1), jnp.int32) - 1, jnp.asarray(far, jnp.int32)


@pytest.mark.parametrize("pattern", COVER_PATTERNS)
@pytest.mark.parametrize("block", [16, 64])
def test_cover_ranges_are_minference_ranges(pattern, block):
    """The cover mask (from `_cover_groups`' associative scan over the gaps' phase maps) equals the mask of
    MInference's range loop transcribed per block; and equals MInference's own loop, clamp included, on every
    block whose slash windows all start at or after key 0 (offsets <= r0); ranges are whole chunks."""
    rng = np.random.default_rng(118)
    q_len = 300 if block == 16 else 700
    verticals, slashes = cover_case(rng, pattern, q_len, block)
    mask = np.asarray(vsr.cover_mask_fn(verticals, slashes, q_len, block)(jnp.arange(q_len)))
    np.testing.assert_array_equal(mask, cover_mask(verticals, slashes, q_len, block))
    clamped = cover_mask(verticals, slashes, q_len, block, clamp=True)
    s = np.asarray(slashes)
    for b, h in np.ndindex(*s.shape[:2]):
        valid = s[b, h][(s[b, h] >= 0) & (s[b, h] < q_len)]
        first_block = -(-int(valid.max(initial=0)) // block) * block
        np.testing.assert_array_equal(mask[b, h, first_block:], clamped[b, h, first_block:])
    index = vsr.build_vertical_slash_ranges(verticals, slashes, q_len, block, semantics="cover")
    count = np.asarray(index.group_counts)[..., -1]
    d0, d1 = np.asarray(index.group_start), np.asarray(index.group_end)
    for b, h in np.ndindex(*count.shape):
        n = count[b, h]
        assert ((d1[b, h, :n] - d0[b, h, :n]) % block == 0).all()  # [r0 - D1, r0 + b - 1 - D0']: whole chunks
        assert (np.diff(d0[b, h, :n]) > 0).all() and (d0[b, h, 1:n] > d1[b, h, : n - 1] + block - 1).all()


def test_cover_index_and_kernel_semantics_must_agree():
    verticals, slashes = nearest_diagonals(1, 2, 3, 64)
    index = vsr.build_vertical_slash_ranges(verticals, slashes, 64, 16)  # exact
    q = jnp.ones((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="built with semantics='exact'"):
        vsr.vertical_slash_attention_ranges(q, q, q, index, scale=0.1, interpret=INTERPRET, semantics="cover")
    with pytest.raises(ValueError, match="semantics='nope'"):
        vsr.build_vertical_slash_ranges(verticals, slashes, 64, 16, semantics="nope")
