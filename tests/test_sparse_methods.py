"""Sparse-prefill methods (A-shape, Tri-shape, MInference vertical-slash and block-sparse): exact pattern
semantics against a float64 numpy reference, index estimation on planted patterns, full budgets equal dense,
MInference's JSON config format, and composition with every position transform."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from reference import attention_f64, cover_mask

import lcjax
from lcjax.methods.a_shape import AShape, TriShape
from lcjax.methods.minference import MInference, MInferenceConfig, estimate_blocks, estimate_vertical_slash
from lcjax.methods.sparse_pattern import SparsePattern, pattern_attention_reference


def numpy_allowed(pattern, seq, lengths, window=None):
    """The pattern's mask built by loops over its index lists (independent of the XLA version)."""
    vert, slash = np.asarray(pattern.vertical), np.asarray(pattern.slash)
    b, h = vert.shape[:2]
    allowed = np.zeros((b, h, seq, seq), bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(seq):
                for j in range(min(i + 1, lengths[bi])):
                    ok = j in vert[bi, hi] or (i - j) in slash[bi, hi]
                    if pattern.blocks is not None:
                        ok |= (j // pattern.block_size) in np.asarray(pattern.blocks)[bi, hi, i // pattern.block_size]
                    if pattern.dense_last:
                        ok |= i >= lengths[bi] - pattern.dense_last
                    if window is not None:
                        ok &= i - j < window
                    allowed[bi, hi, i, j] = ok
    return allowed


@pytest.mark.parametrize(
    "heads,kv_heads,with_blocks,window", [(4, 4, False, None), (8, 2, True, None), (4, 1, True, 7)]
)
def test_pattern_reference_matches_float64(heads, kv_heads, with_blocks, window):
    rng = np.random.default_rng(heads + kv_heads)
    b, seq, d, bs = 2, 37, 16, 8
    q = rng.standard_normal((b, seq, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, seq, kv_heads, d)).astype(np.float32)
    vert = rng.integers(-1, seq, (b, heads, 5)).astype(np.int32)  # -1 slots, duplicates allowed
    vert[0, 0] = -1  # a head with no verticals
    slash = rng.integers(-1, seq, (b, heads, 4)).astype(np.int32)
    blocks = rng.integers(-1, 5, (b, heads, 5, 2)).astype(np.int32) if with_blocks else None
    pattern = SparsePattern(
        jnp.asarray(vert),
        jnp.asarray(slash),
        None if blocks is None else jnp.asarray(blocks),
        block_size=bs,
        dense_last=3 if with_blocks else 0,
    )
    lengths = np.array([seq, 29])
    out = pattern_attention_reference(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        pattern,
        jnp.asarray(lengths),
        d**-0.5,
        q_chunk=16,
        sliding_window=window,
    )
    allowed = numpy_allowed(pattern, seq, lengths, window)
    ref = attention_f64(q, k, v, allowed, d**-0.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=3e-5)
    empty_rows = ~allowed.any(-1)  # [b, h, i]
    assert empty_rows.any() and np.all(np.asarray(out).transpose(0, 2, 1, 3)[empty_rows] == 0)


def planted(seq=96, d=32, heads=2, seed=0, column=17, offset=9):
    """Keys are random unit vectors; the last queries point at key `column` (head 0) and at key i - `offset`
    (head 1), so the estimators must find that vertical line and that diagonal."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, seq, 1, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.standard_normal((1, seq, heads, d)) * 0.05
    q[0, :, 0] += 8 * k[0, column, 0]
    for i in range(offset, seq):
        q[0, i, 1] += 8 * k[0, i - offset, 0]
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_vertical_slash_estimate_finds_planted_line_and_diagonal():
    q, k = planted()
    lengths = jnp.array([96])
    vert, slash = estimate_vertical_slash(q, k, lengths, n_vertical=31, n_slash=101, last_q=16, scale=1.0)
    vert, slash = np.asarray(vert), np.asarray(slash)
    assert set(range(30)) <= set(vert[0, 0]) and 17 in vert[0, 0]  # 30 forced columns + the planted one
    assert 9 in slash[0, 1][:100]  # nearest 100 forced; 9 among them
    vert2, slash2 = estimate_vertical_slash(q, k, lengths, n_vertical=31, n_slash=101, last_q=16, scale=1.0)
    np.testing.assert_array_equal(vert, np.asarray(vert2))  # deterministic


def test_slash_estimate_ranks_far_planted_diagonal_first_after_forced():
    q, k = planted(seq=256, offset=150)
    vert, slash = estimate_vertical_slash(q, k, jnp.array([256]), n_vertical=30, n_slash=101, last_q=16, scale=1.0)
    assert int(slash[0, 1, 100]) == 150  # the first slot after the 100 forced ones


def test_line_scores_equal_float64_sums_over_columns_and_diagonals():
    """The gather-free diagonal sums (`_line_scores`) against explicit loops in float64, ragged lengths
    including one shorter than last_q (its rows clip to 0)."""
    from lcjax.methods.minference import _line_scores
    from lcjax.methods.sparse_prefill import last_rows

    rng = np.random.default_rng(119)
    b, seq, kvh, g, d, last_q = 3, 100, 2, 3, 16, 16
    q = rng.standard_normal((b, seq, kvh * g, d))
    k = rng.standard_normal((b, seq, kvh, d))
    lengths = np.array([100, 57, 9])
    rows = np.asarray(last_rows(jnp.asarray(lengths), last_q))
    q_last = np.take_along_axis(q, rows[:, :, None, None], axis=1).reshape(b, last_q, kvh, g, d)
    vertical, slash = _line_scores(
        jnp.asarray(q_last, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(rows), jnp.asarray(lengths), 0.3
    )
    want_v, want_s = np.zeros((b, kvh, g, seq)), np.zeros((b, kvh, g, seq))
    for bi in range(b):
        for kv in range(kvh):
            for gi in range(g):
                for t in range(last_q):
                    r = rows[bi, t]
                    keys = np.arange(min(r + 1, lengths[bi]))
                    logits = q_last[bi, t, kv, gi] @ k[bi, keys, kv].T * 0.3
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    want_v[bi, kv, gi, keys] += p
                    want_s[bi, kv, gi, r - keys] += p
    np.testing.assert_allclose(np.asarray(vertical), want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(slash), want_s, rtol=1e-5, atol=1e-6)


def test_block_estimate_finds_planted_block_and_keeps_diagonal():
    q, k = planted(seq=128, column=5)
    blocks = np.asarray(estimate_blocks(q, k, jnp.array([128]), top_k=2, block_size=16))
    assert blocks.shape == (1, 2, 8, 2)
    for qb in range(8):
        assert qb in blocks[0, 0, qb]  # diagonal always kept
        if qb > 0:
            assert 0 in blocks[0, 0, qb]  # the block holding key 5


@pytest.fixture(scope="module")
def llama():
    model, _ = lcjax.load_model(FIXTURES / "hf" / "llama", dtype="float32")
    ids = np.load(FIXTURES / "hf" / "llama" / "reference.npz")["input_ids"]
    return model, ids


@pytest.mark.parametrize(
    "method",
    [
        AShape(n_init=0, n_local=64, backend="xla"),
        TriShape(n_init=4, n_local=4, n_last=64, backend="xla"),
        "vertical_slash_full",
        "vertical_slash_cover_full",
        "block_sparse_full",
        "mixed_full",
    ],
)
def test_full_budgets_give_exactly_the_dense_logits(llama, method):
    model, ids = llama
    L, H = model.config.num_layers, model.config.num_heads
    if method == "vertical_slash_full":
        method = MInference.vertical_slash(L, H, vertical_size=64, slash_size=64, backend="xla")
    elif method == "vertical_slash_cover_full":
        method = MInference.vertical_slash(
            L, H, vertical_size=64, slash_size=64, backend="xla", slash_semantics="cover"
        )
    elif method == "block_sparse_full":
        method = dataclasses.replace(
            MInference.block_sparse(L, H, top_k=64, backend="xla"),
            config=dataclasses.replace(MInference.block_sparse(L, H, 64).config, block_size=8),
        )
    elif method == "mixed_full":
        kinds = ["vertical_and_slash", "stream_llm", "block_sparse", "vertical_and_slash"]
        layers = [{str(h): [kinds[(h + l) % 4], 64, 64, 0.0] for h in range(H)} for l in range(L)]
        method = MInference(dataclasses.replace(MInferenceConfig.from_json(layers), block_size=8), "xla")
    dense, _ = model.prefill(ids)
    sparse, _ = model.with_transforms(attention=method).prefill(ids)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=2e-5)


def test_small_budgets_change_logits_but_decode_stays_dense(llama):
    model, ids = llama
    sparse = model.with_transforms(attention=AShape(n_init=2, n_local=4, backend="xla"))
    dense_logits, _ = model.prefill(ids)
    sparse_logits, _ = sparse.prefill(ids)
    assert np.abs(np.asarray(sparse_logits) - np.asarray(dense_logits)).max() > 1e-2
    from lcjax.generate import generate

    (a,), cache_a = generate(model, ids[0, :4], 6)  # 4-token prompt: A-shape is exact
    (b,), cache_b = generate(sparse, ids[0, :4], 6)
    assert a == b


def test_minference_json_round_trip_and_errors(tmp_path):
    layers = [
        {"0": ["vertical_and_slash", 1000, 6096, 0.33], "1": ["stream_llm", 100, 800, 0.9]},
        {"0": ["block_sparse", 100, 0, 0.5], "1": ["vertical_and_slash", 30, 800, 0.7]},
    ]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(layers))
    cfg = MInferenceConfig.from_json(path)
    assert cfg.patterns[0][1].kind == "stream_llm" and cfg.patterns[1][0].v == 100
    assert cfg.to_json() == layers
    cfg.check(2, 2)
    with pytest.raises(ValueError, match="2 layers x 2 heads; the model has 3 x 2"):
        cfg.check(3, 2)
    with pytest.raises(ValueError, match="Unknown MInference pattern 'dilated'"):
        MInferenceConfig.from_json([{"0": ["dilated", 1, 2, 0.0]}])
    with pytest.raises(ValueError, match="lacks head 1"):
        MInferenceConfig.from_json([{"0": ["stream_llm", 1, 2, 0.0], "2": ["stream_llm", 1, 2, 0.0]}])


@pytest.mark.parametrize("rope_name", ["default", "linear", "dynamic", "yarn", "llama3", "longrope"])
def test_every_method_composes_with_every_position_transform(llama, rope_name):
    model, ids = llama
    dim, theta = model.config.rotary_dim, 10000.0
    transform = {
        "default": lcjax.positions.rope(dim, theta),
        "linear": lcjax.positions.linear(dim, theta, 2.0),
        "dynamic": lcjax.positions.dynamic_ntk(dim, theta, 2.0, 32),
        "yarn": lcjax.positions.yarn(dim, theta, 4.0, 32),
        "llama3": lcjax.positions.llama3(dim, theta, 8.0, 1.0, 4.0, 32),
        "longrope": lcjax.positions.longrope(dim, theta, [1.0] * (dim // 2), [2.0] * (dim // 2), 32, 128),
    }[rope_name]
    base = model.with_transforms(positions=transform)
    dense, _ = base.prefill(ids)
    L, H = model.config.num_layers, model.config.num_heads
    for method in (AShape(n_init=0, n_local=64, backend="xla"), MInference.vertical_slash(L, H, 64, 64, backend="xla")):
        out, _ = base.with_transforms(attention=method).prefill(ids)
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


def test_pattern_search_picks_per_head_patterns_and_writes_minference_json(llama, tmp_path):
    from lcjax.methods.minference_search import search_patterns

    model, ids = llama
    cands = (
        MInferenceConfig.uniform(1, 1, "stream_llm", 4, 8).patterns[0][0],
        MInferenceConfig.uniform(1, 1, "vertical_and_slash", 30, 50).patterns[0][0],
    )
    cfg, raw = search_patterns(model, ids[0], candidates=cands, tile_budget=1.0, min_row=16, tile=8)
    L, H = model.config.num_layers, model.config.num_heads
    assert raw["recall"].shape == (L, H, 2) and np.all(raw["recall"] <= 1 + 1e-5) and np.all(raw["recall"] > 0)
    # vertical-slash with 30 columns + 50 diagonals covers all 48 causal keys: recall 1, no error, full cost
    np.testing.assert_allclose(raw["recall"][..., 1], 1.0, atol=1e-5)
    np.testing.assert_allclose(raw["error"][..., 1], 0.0, atol=1e-5)
    assert np.all(raw["error"][..., 0] > 1e-3)
    np.testing.assert_allclose(raw["cost"][..., 1], 1.0)
    assert np.all(raw["recall"][..., 0] < 0.999)  # sinks + window lose mass
    assert all(p.kind == "vertical_and_slash" for layer in cfg.patterns for p in layer)
    # with a budget that only the window pattern meets, the search must take it
    assert raw["cost"][..., 0].max() < 1.0
    cheap, _ = search_patterns(
        model, ids[0], candidates=cands, tile_budget=float(raw["cost"][..., 0].max()), min_row=16, tile=8
    )
    assert all(p.kind == "stream_llm" for layer in cheap.patterns for p in layer)
    # with a low recall target the cheaper pattern wins wherever it reaches it
    lax, _ = search_patterns(model, ids[0], candidates=cands, max_error=1.0, min_row=16, tile=8)
    assert all(p.kind == "stream_llm" for layer in lax.patterns for p in layer)
    assert all(p.kind == "stream_llm" for layer in cheap.patterns for p in layer)
    cfg.save(tmp_path / "p.json")
    assert MInferenceConfig.from_json(tmp_path / "p.json").patterns == cfg.patterns  # JSON holds patterns only


@pytest.mark.parametrize("dense_last,semantics", [(0, "exact"), (5, "exact"), (5, "cover")])
def test_pallas_path_equals_reference_in_interpret_mode(dense_last, semantics):
    """The Pallas route (vertical-slash kernel + block kernel + dense tail) computes the same function as the
    XLA reference on a pattern mixing per-head kinds, on fresh random inputs."""
    from lcjax.methods.sparse_prefill import pallas_pattern_attention

    rng = np.random.default_rng(7 + dense_last)
    b, seq, h, kvh, d, bs = 1, 70, 4, 2, 64, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, seq, n, d)), jnp.float32) for n in (h, kvh, kvh))
    vert = rng.integers(0, seq, (b, h, 6)).astype(np.int32)
    slash = rng.integers(0, seq, (b, h, 5)).astype(np.int32)
    blocks = rng.integers(0, 5, (b, h, 5, 3)).astype(np.int32)
    vert[:, 2:], slash[:, 2:] = -1, -1  # heads 2, 3: blocks only
    blocks[:, :2] = -1  # heads 0, 1: lines only
    pattern = SparsePattern(
        jnp.asarray(vert),
        jnp.asarray(slash),
        jnp.asarray(blocks),
        block_size=bs,
        dense_last=dense_last,
        slash_semantics=semantics,
    )
    lengths = jnp.array([seq])
    ref = pattern_attention_reference(q, k, v, pattern, lengths, d**-0.5)
    if semantics == "cover":  # the reference's cover mask on the line heads, against the numpy one
        mask = cover_mask(vert[:, :2], slash[:, :2], seq, bs)
        mask[..., seq - dense_last :, :] = np.tril(np.ones((seq, seq), bool))[seq - dense_last :]
        np.testing.assert_allclose(
            np.asarray(ref)[:, :, :2], attention_f64(q[:, :, :2], k[:, :, :1], v[:, :, :1], mask, d**-0.5), atol=2e-5
        )
    out = pallas_pattern_attention(q, k, v, pattern, lengths, d**-0.5, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-4, rtol=1e-3)


def test_tile_costs_count_visited_tiles(llama):
    from lcjax.methods.sparse_prefill import tile_costs

    model, ids = llama
    full = tile_costs(model, AShape(n_init=0, n_local=64, backend="xla"), ids[0], tile=8)
    np.testing.assert_allclose(full, 1.0)
    # a 1-token window visits exactly the diagonal tiles: 6 of the 21 causal 8x8 tiles of 48 tokens
    diag = tile_costs(model, AShape(n_init=0, n_local=1, backend="xla"), ids[0], tile=8)
    np.testing.assert_allclose(diag, 6 / 21)


def test_shipped_smollm2_config_fits_the_builtin_model():
    from lcjax.methods.minference import shipped_config

    cfg = shipped_config("smollm2-135m")
    cfg.check(30, 9)  # SmolLM2-135M: 30 layers x 9 query heads
    kinds = {p.kind for layer in cfg.patterns for p in layer}
    assert kinds <= {"vertical_and_slash", "stream_llm", "block_sparse"} and len(kinds) > 1
    with pytest.raises(ValueError, match="No shipped MInference config for 'llama-70b'"):
        shipped_config("llama-70b")
