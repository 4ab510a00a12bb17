"""MInference's offline, kernel-aware pattern search: pick each head's pattern on a calibration prompt.

For every (layer, head) and every candidate pattern, the search runs the candidate's *online* index
estimate (exactly what `MInference` will run), then measures on the dense attention of the calibration
prompt:
- error: the relative error of the head's attention output on the query rows from `min_row` on, against
  dense attention (MInference's released configs were fitted this way: "fit_o"); recall, the attention
  mass kept, is reported too;
- cost: the 64x64 tiles the sparse kernel must visit (a tile with any allowed pair is computed whole),
  as a fraction of the causal tiles: this is what makes the search kernel-aware, since pair counts
  under-state what scattered lines cost a tiled kernel.
Each head takes the cheapest candidate (by tile cost, within `tile_budget`) whose error is at most
`max_error`, or the most accurate one when none is; so heads whose attention is easy to cover get cheap
patterns. The result is written in MInference's JSON format (`MInferenceConfig.save`). The search is itself an
attention transform that threads a score table through the model's layer scan in place of a KV cache, so it
needs no hooks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.methods.minference import HeadPattern, MInference, MInferenceConfig
from lcjax.methods.sparse_pattern import pattern_mask_fn, tile_fraction
from lcjax.models.transformer import Transformer, forward
from lcjax.numerics import attention_mask, masked_attention


def default_candidates(seq_len: int) -> tuple[HeadPattern, ...]:
    """A-shape, vertical-slash and block-sparse candidates sized for a `seq_len` prompt.

    MInference's search list was written for 128K prompts ((30, 800), (100, 750), (500, 700), (3500, 100),
    stream (100, 800)); here budgets scale with the prompt so every kind competes at comparable cost.
    """
    n = seq_len
    blocks = max(1, n // 64)
    return (
        HeadPattern("stream_llm", 64, max(64, n // 8)),
        HeadPattern("stream_llm", 64, max(64, n // 4)),
        HeadPattern("stream_llm", 64, max(64, n // 2)),
        HeadPattern("vertical_and_slash", max(30, n // 16), max(50, n // 16)),
        HeadPattern("vertical_and_slash", max(30, n // 8), max(100, n // 32)),
        HeadPattern("vertical_and_slash", max(30, n // 32), max(50, n // 8)),
        HeadPattern("vertical_and_slash", max(30, n // 8), max(100, n // 4)),
        HeadPattern("block_sparse", max(1, blocks // 8), 0),
        HeadPattern("block_sparse", max(1, blocks // 4), 0),
        HeadPattern("block_sparse", max(1, blocks // 2), 0),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Scores:
    recall: jax.Array  # float32 [layers, heads, candidates]
    error: jax.Array  # float32 [layers, heads, candidates]
    cost: jax.Array  # float32 [layers, heads, candidates]


@dataclasses.dataclass(frozen=True)
class _SearchAttention:
    candidates: tuple[HeadPattern, ...]
    num_layers: int
    min_row: int
    chunk: int = 256
    tile: int = 64

    def __call__(self, q, k, v, scores: _Scores, meta):
        b, seq, h, d = q.shape
        kvh = k.shape[2]
        lengths = meta.lengths
        causal = lambda rows: attention_mask(
            jnp.broadcast_to(rows, (b, rows.shape[0])), seq, lengths, meta.sliding_window
        )[:, None]
        out = masked_attention(q, k, v, causal, meta.scale)
        masks = []
        for cand in self.candidates:
            single = MInference(MInferenceConfig(((cand,) * h,) * self.num_layers, block_size=self.tile))
            masks.append(pattern_mask_fn(single.pattern(q, k, meta), seq, lengths, meta.sliding_window))
        chunk = min(self.chunk, -(-seq // self.tile) * self.tile)  # whole tiles per chunk

        def rows_of(c):
            return c * chunk + jnp.arange(chunk, dtype=jnp.int32)

        def quality_of_chunk(c):
            # recall and output error on the counted rows (those at or past min_row)
            rows = rows_of(c)
            qr = jnp.take(q, jnp.minimum(rows, seq - 1), axis=1).reshape(b, chunk, kvh, h // kvh, d)
            logits = jnp.einsum("bqkgd,btkd->bkgqt", qr, k, preferred_element_type=jnp.float32) * meta.scale
            logits = logits.reshape(b, h, chunk, seq)
            counted = (rows >= self.min_row) & (rows < seq)
            ok = causal(rows) & counted[None, None, :, None]
            probs = jnp.where(ok, jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1), 0.0)
            ref = jnp.take(out, jnp.minimum(rows, seq - 1), axis=1).astype(jnp.float32)  # [b, chunk, h, d]
            ref = jnp.where(counted[None, :, None, None], ref, 0.0)
            vg = jnp.repeat(v.astype(jnp.float32), h // kvh, axis=2)  # small: [b, seq, h, d]
            recall, err = [], []
            for mask_fn in masks:
                m = mask_fn(rows) & ok
                recall.append(jnp.sum(probs * m, axis=(0, 2, 3)))
                p = jnp.where(m, jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=-1), 0.0)
                approx = jnp.einsum("bhqt,bthd->bqhd", p, vg)
                err.append(jnp.sum((approx - ref) ** 2, axis=(0, 1, 3)))
            return jnp.stack(recall, -1), jnp.stack(err, -1), jnp.sum(ref**2, axis=(0, 1, 3))

        cost = jnp.stack([tile_fraction(m, seq, lengths, self.tile, chunk) for m in masks], -1)  # [h, C]
        first = self.min_row // chunk
        recall, err, norm = jax.lax.map(quality_of_chunk, jnp.arange(first, -(-seq // chunk)))
        rows_counted = jnp.maximum(jnp.sum(jnp.maximum(lengths - self.min_row, 0)), 1)
        recall = recall.sum(0) / rows_counted  # [h, C]
        error = jnp.sqrt(err.sum(0) / jnp.maximum(norm.sum(0), 1e-30)[:, None])  # relative, [h, C]
        layer = meta.layer
        scores = _Scores(
            recall=scores.recall.at[layer].set(recall),
            error=scores.error.at[layer].set(error),
            cost=scores.cost.at[layer].set(cost),
        )
        return out, scores


def _score_prompt(
    model: Transformer, tokens: jax.Array, candidates, min_row: int | None, question_rows: int | None, tile: int
) -> _Scores:
    seq = tokens.shape[1]
    cfg = model.config
    if min_row is None:
        min_row = seq - min(question_rows, seq)
    search = _SearchAttention(tuple(candidates), cfg.num_layers, min_row, tile=tile)
    zeros = jnp.zeros((cfg.num_layers, cfg.num_heads, len(candidates)), jnp.float32)

    @jax.jit
    def run(params, tokens):
        lengths = jnp.full((1,), seq, jnp.int32)
        positions = jnp.arange(seq, dtype=jnp.int32)[None]
        _, scores = forward(
            params,
            cfg,
            tokens,
            positions,
            jnp.zeros((1,), jnp.int32),
            lengths,
            _Scores(zeros, zeros, zeros),
            "prefill",
            search,
            model.positions,
        )
        return scores

    return jax.tree.map(np.asarray, run(model.params, tokens))


def search_patterns(
    model: Transformer,
    prompts,
    *,
    candidates: tuple[HeadPattern, ...] | None = None,
    max_error: float = 0.05,
    tile_budget: float = 1.0,
    min_row: int | None = None,
    question_rows: int = 64,
    tile: int = 64,
) -> tuple[MInferenceConfig, dict]:
    """Searches one pattern per (layer, head) on calibration prompts (`int [seq]` each, or one prompt).

    A head's score over several prompts is its worst case (largest error and cost, smallest recall), so a
    retrieval head that needs far-away keys in one prompt keeps a pattern that reaches them.
    Returns the config (MInference's JSON via `.save`) and the raw `recall`/`error`/`cost` tables
    `[layers, heads, candidates]` for reports. `max_error`: the largest relative error of a head's
    attention output (on the counted rows) a pattern may cause; `tile_budget`: the largest fraction of
    causal tiles a head may cost; `question_rows`: recall and error count each prompt's last that many
    rows, where a task's question sits: the rows whose view of the whole context decides the answer (64,
    as MInference's online estimate; judging on the last 1/16 of the rows instead picked window patterns that
    dropped the needle, docs/methods.md); `min_row`: an absolute first row instead;
    `tile`: the kernel's tile (and block-sparse block) size.
    """
    prompts = [prompts] if np.ndim(prompts[0]) == 0 else list(prompts)
    seq = min(len(p) for p in prompts)
    candidates = candidates or default_candidates(seq)
    scores = [
        _score_prompt(model, jnp.asarray(p, jnp.int32).reshape(1, -1), candidates, min_row, question_rows, tile)
        for p in prompts
    ]
    recall = np.min([s.recall for s in scores], axis=0)
    error = np.max([s.error for s in scores], axis=0)
    cost = np.max([s.cost for s in scores], axis=0)
    cfg = model.config
    layers = []
    for li in range(cfg.num_layers):
        heads = []
        for hi in range(cfg.num_heads):
            e, c_ = error[li, hi], cost[li, hi]
            affordable = np.flatnonzero(c_ <= tile_budget)
            pool = affordable if affordable.size else np.array([int(np.argmin(c_))])
            good = pool[e[pool] <= max_error]
            best = good[np.argmin(c_[good])] if good.size else pool[np.argmin(e[pool])]
            c = candidates[best]
            heads.append(HeadPattern(c.kind, c.v, c.s, float(recall[li, hi, best])))
        layers.append(tuple(heads))
    return MInferenceConfig(tuple(layers), block_size=tile), dict(
        recall=recall, error=error, cost=cost, candidates=candidates
    )
