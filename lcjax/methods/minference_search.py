"""MInference's offline, kernel-aware pattern search: pick each head's pattern on a calibration prompt.

For every (layer, head) and every candidate pattern, the search runs the candidate's *online* index
estimate (exactly what `MInference` will run), then measures on the dense attention of the calibration
prompt:
- recall: the attention mass the pattern keeps, averaged over query rows from `min_row` on (MInference's
  criterion);
- cost: the 64x64 tiles the sparse kernel must visit (a tile with any allowed pair is computed whole),
  as a fraction of the causal tiles: this is what makes the search kernel-aware, since pair counts
  under-state what scattered lines cost a tiled kernel.
Each head takes the cheapest candidate (by tile cost, within `tile_budget`) whose recall reaches
`min_recall`, or the highest-recall one when none does; so heads whose attention is easy to cover get cheap
patterns. The result is written in MInference's JSON format (`MInferenceConfig.save`). The search is itself an attention transform that
threads a score table through the model's layer scan in place of a KV cache, so it needs no hooks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import attention_mask, masked_attention
from lcjax.methods.minference import HeadPattern, MInference, MInferenceConfig
from lcjax.methods.sparse_pattern import pattern_mask_fn
from lcjax.models.transformer import Transformer, forward


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
        HeadPattern("vertical_and_slash", 30, max(50, n // 16)),
        HeadPattern("vertical_and_slash", max(30, n // 16), max(50, n // 16)),
        HeadPattern("vertical_and_slash", max(30, n // 8), max(100, n // 32)),
        HeadPattern("vertical_and_slash", max(30, n // 32), max(50, n // 8)),
        HeadPattern("block_sparse", max(1, blocks // 8), 0),
        HeadPattern("block_sparse", max(1, blocks // 4), 0),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Scores:
    recall: jax.Array   # float32 [layers, heads, candidates]
    cost: jax.Array     # float32 [layers, heads, candidates]


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
        causal = lambda rows: attention_mask(jnp.broadcast_to(rows, (b, rows.shape[0])), seq, lengths,
                                             meta.sliding_window)[:, None]
        out = masked_attention(q, k, v, causal, meta.scale)
        masks = []
        for cand in self.candidates:
            single = MInference(MInferenceConfig(((cand,) * h,) * self.num_layers, block_size=self.tile))
            masks.append(pattern_mask_fn(single.pattern(q, k, meta), seq, lengths, meta.sliding_window))
        # chunks hold whole 64-row tiles; keys are padded to whole tiles
        chunk = min(self.chunk, -(-seq // self.tile) * self.tile)
        num_chunks = -(-seq // chunk)
        nkb = -(-seq // self.tile)
        key_pad = nkb * self.tile - seq

        def per_chunk(c):
            rows = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            qr = jnp.take(q, jnp.minimum(rows, seq - 1), axis=1).reshape(b, chunk, kvh, h // kvh, d)
            logits = jnp.einsum("bqkgd,btkd->bkgqt", qr, k, preferred_element_type=jnp.float32) * meta.scale
            logits = logits.reshape(b, h, chunk, seq)
            ok = causal(rows) & (rows < seq)[None, None, :, None]
            probs = jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1)
            probs = jnp.where(ok, probs, 0.0)
            counted = (rows >= self.min_row)[None, None, :, None]
            recall, tiles = [], []
            for mask_fn in masks:
                m = mask_fn(rows) & ok
                recall.append(jnp.sum(jnp.where(counted, probs * m, 0.0), axis=(0, 2, 3)))
                # a tile is computed if any pair in it is allowed
                mp = jnp.pad(m, ((0, 0), (0, 0), (0, 0), (0, key_pad)))
                cells = mp.reshape(b, h, chunk // self.tile, self.tile, nkb, self.tile).any(axis=(0, 3, 5))
                tiles.append(cells.sum(axis=(1, 2)))
            return jnp.stack(recall, -1), jnp.stack(tiles, -1)

        recall, tiles = jax.lax.map(per_chunk, jnp.arange(num_chunks))
        rows_counted = jnp.maximum(jnp.sum(jnp.maximum(lengths - self.min_row, 0)), 1)
        recall = recall.sum(0) / rows_counted                                   # [h, C]
        tile_count = tiles.sum(0)                                               # [h, C]
        causal_tiles = nkb * (nkb + 1) / 2
        layer = meta.layer
        scores = _Scores(recall=scores.recall.at[layer].set(recall),
                         cost=scores.cost.at[layer].set(tile_count / causal_tiles))
        return out, scores


def search_patterns(model: Transformer, tokens, *, candidates: tuple[HeadPattern, ...] | None = None,
                    min_recall: float = 0.9, tile_budget: float = 1.0, min_row: int | None = None,
                    tile: int = 64) -> tuple[MInferenceConfig, dict]:
    """Searches one pattern per (layer, head) on calibration `tokens: int [seq]` (one prompt).

    Returns the config (MInference's JSON via `.save`) and the raw `recall`/`cost` tables
    `[layers, heads, candidates]` for reports. `min_recall`: the attention mass a head's pattern should
    keep; `tile_budget`: the largest fraction of causal tiles a head may cost; `min_row`: recall counts rows from here (default: the last 3/4 of the prompt); `tile`:
    the kernel's tile (and block-sparse block) size.
    """
    tokens = jnp.asarray(tokens, jnp.int32).reshape(1, -1)
    seq = tokens.shape[1]
    cfg = model.config
    candidates = candidates or default_candidates(seq)
    min_row = seq // 4 if min_row is None else min_row
    search = _SearchAttention(tuple(candidates), cfg.num_layers, min_row, tile=tile)
    zeros = jnp.zeros((cfg.num_layers, cfg.num_heads, len(candidates)), jnp.float32)

    @jax.jit
    def run(params, tokens):
        lengths = jnp.full((1,), seq, jnp.int32)
        positions = jnp.arange(seq, dtype=jnp.int32)[None]
        _, scores = forward(params, cfg, tokens, positions, jnp.zeros((1,), jnp.int32), lengths,
                            _Scores(zeros, zeros), "prefill", search, model.positions)
        return scores

    scores = run(model.params, tokens)
    recall, cost = np.asarray(scores.recall), np.asarray(scores.cost)
    layers = []
    for li in range(cfg.num_layers):
        heads = []
        for hi in range(cfg.num_heads):
            r, c_ = recall[li, hi], cost[li, hi]
            affordable = np.flatnonzero(c_ <= tile_budget)
            pool = affordable if affordable.size else np.array([int(np.argmin(c_))])
            good = pool[r[pool] >= min_recall]
            best = good[np.argmin(c_[good])] if good.size else pool[np.argmax(r[pool])]
            c = candidates[best]
            heads.append(HeadPattern(c.kind, c.v, c.s, float(recall[li, hi, best])))
        layers.append(tuple(heads))
    return MInferenceConfig(tuple(layers), block_size=tile), dict(recall=recall, cost=cost, candidates=candidates)
