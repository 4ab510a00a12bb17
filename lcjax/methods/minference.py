"""MInference (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention"): each head gets one of three patterns offline; the sparse indices are
estimated online from the prompt itself; the kernels compute only those.

- vertical-slash (`vertical_and_slash`, v, s): from the last `last_q`=64 queries' attention, keep the
  `v` key columns and `s` diagonals with the most mass (the first 30 columns and the 100 nearest
  diagonals are always kept). Defaults v=1000, s=6096.
- block-sparse (`block_sparse`, top_k): mean-pool q and k over 64-token blocks, keep each query block's
  `top_k`=100 key blocks by pooled score (its diagonal block always kept, so no row is empty).
- A-shape (`stream_llm`, n_init, n_local): the static sinks + window pattern.

`MInferenceConfig` holds one pattern per (layer, head) and reads/writes MInference's published JSON
(a list over layers of {"head": [type, v, s, score]}), so its configs for Llama-3-8B-262K, Phi-3-mini-128K,
Qwen2 load as they are. Prefill is sparse; decode stays dense.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.methods.sparse_pattern import SparsePattern
from lcjax.methods.sparse_prefill import Backend, budget_mask, last_rows, sparse_prefill

KINDS = ("vertical_and_slash", "stream_llm", "block_sparse")
VERTICAL_SIZE, SLASH_SIZE = 1000, 6096  # MInference's (and SCBench's) vertical-slash budgets
TOP_K = 100  # MInference's block-sparse budget: key blocks per query block
ALWAYS_VERTICAL = 30  # MInference always keeps the first 30 key columns ...
ALWAYS_SLASH = 100  # ... and the 100 nearest diagonals


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """One head's pattern: kind in KINDS; (v, s) = (vertical_size, slash_size) for vertical_and_slash,
    (n_init, n_local) for stream_llm, (top_k, unused) for block_sparse; score: the search's recall."""

    kind: str
    v: int
    s: int
    score: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown MInference pattern {self.kind!r}; supported: {', '.join(KINDS)}.")


@dataclasses.dataclass(frozen=True)
class MInferenceConfig:
    """Per-layer, per-head patterns: `patterns[layer][head]`."""

    patterns: tuple[tuple[HeadPattern, ...], ...]
    last_q: int = 64
    block_size: int = 64

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_heads: int,
        kind: str = "vertical_and_slash",
        v: int = VERTICAL_SIZE,
        s: int = SLASH_SIZE,
    ) -> "MInferenceConfig":
        """Every head the same pattern (the defaults are MInference's vertical-slash budgets)."""
        return cls(tuple(tuple(HeadPattern(kind, v, s) for _ in range(num_heads)) for _ in range(num_layers)))

    @classmethod
    def from_json(cls, source: str | os.PathLike | list) -> "MInferenceConfig":
        """Reads MInference's format: `[{"0": ["vertical_and_slash", 1000, 6096, 0.33], ...}, ...]`."""
        data = source
        if not isinstance(source, list):
            path = Path(source)
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: cannot read an MInference pattern config ({e}).") from e
        if not isinstance(data, list) or not all(isinstance(layer, dict) for layer in data):
            raise ValueError(
                "An MInference config is a JSON list (one entry per layer) of {head: [type, v, s, score]}."
            )
        layers = []
        for li, layer in enumerate(data):
            heads = []
            for hi in range(len(layer)):
                entry = layer.get(str(hi))
                if entry is None or len(entry) < 3:
                    raise ValueError(f"MInference config layer {li} lacks head {hi} (or its [type, v, s]).")
                heads.append(
                    HeadPattern(entry[0], int(entry[1]), int(entry[2]), float(entry[3]) if len(entry) > 3 else 0.0)
                )
            layers.append(tuple(heads))
        return cls(tuple(layers))

    def to_json(self) -> list:
        return [{str(h): [p.kind, p.v, p.s, p.score] for h, p in enumerate(layer)} for layer in self.patterns]

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    def check(self, num_layers: int, num_heads: int) -> None:
        if len(self.patterns) != num_layers or any(len(layer) != num_heads for layer in self.patterns):
            shape = (len(self.patterns), len(self.patterns[0]) if self.patterns else 0)
            raise ValueError(
                f"MInference config has {shape[0]} layers x {shape[1]} heads; the model has {num_layers} x {num_heads}."
            )

    def table(self) -> dict[str, np.ndarray]:
        """int32 arrays `[layers, heads]`: kind id, v, s."""
        kind = np.array([[KINDS.index(p.kind) for p in layer] for layer in self.patterns], np.int32)
        v = np.array([[p.v for p in layer] for layer in self.patterns], np.int32)
        s = np.array([[p.s for p in layer] for layer in self.patterns], np.int32)
        return dict(kind=kind, v=v, s=s)


# ---- online estimation --------------------------------------------------------------------------------


def _line_scores(q_last: jax.Array, k: jax.Array, rows: jax.Array, lengths: jax.Array, scale: float):
    """Column and diagonal mass of the last queries' softmax attention, for whole KV-head query groups.

    q_last `[b, last_q, kvh, g, d]`, k `[b, seq, kvh, d]`, rows `[b, last_q]` (their positions: the last
    last_q rows, clipped at 0). Returns fp32 vertical `[b, kvh, g, seq]` (column sums) and slash
    `[b, kvh, g, seq]` (offset o collects probs[t, row_t - o]).

    The diagonals are summed without a gather: with keys reversed from each sequence's last key, diagonal o
    of row t sits at column o + last_q - 1 - t; reading the rows (in reverse order) of the flattened
    `[last_q, W]` array with a stride of W + 1 lines every diagonal up in one column.
    """
    b, seq = k.shape[:2]
    last_q = q_last.shape[1]
    logits = jnp.einsum("bqkgd,btkd->bkgqt", q_last, k, preferred_element_type=jnp.float32) * scale
    keys = jnp.arange(seq)
    ok = (keys[None, None, :] <= rows[:, :, None]) & (keys[None, None, :] < lengths[:, None, None])
    probs = jax.nn.softmax(jnp.where(ok[:, None, None], logits, -jnp.inf), axis=-1)  # [b, kvh, g, last_q, seq]
    width = seq + last_q
    reversed_keys = jnp.pad(probs[..., ::-1], [(0, 0)] * 4 + [(0, width)])
    # from_last[t, x] = probs[t, length - 1 - x] (zero past the first key)
    from_last = jax.vmap(lambda p, n: jax.lax.dynamic_slice_in_dim(p, seq - n, width, axis=-1))(reversed_keys, lengths)
    flat = from_last[..., ::-1, :].reshape(*probs.shape[:3], last_q * width)
    skewed = jnp.pad(flat, [(0, 0)] * 3 + [(0, last_q)]).reshape(*probs.shape[:3], last_q, width + 1)
    slash = skewed[..., :seq].sum(axis=3)
    # rows clipped at 0 (a sequence shorter than last_q) attend key 0 only: offset 0 of their true row
    clipped = jnp.maximum(last_q - lengths, 0).astype(jnp.float32)
    slash = slash.at[..., 0].add(clipped[:, None, None])
    return probs.sum(axis=3), slash


ESTIMATE_BYTES = 1 << 30  # fp32 score rows of one step of the estimate (a few copies of it are alive at once)


def estimate_vertical_slash(
    q: jax.Array, k: jax.Array, lengths: jax.Array, n_vertical: int, n_slash: int, last_q: int = 64, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """MInference's online estimate: top key columns and diagonals of the last queries' attention.

    q `[batch, seq, heads, head_dim]`, k `[batch, seq, kv_heads, head_dim]` (rotated), lengths `[batch]`.
    Returns vertical `[batch, heads, n_vertical]` key indices and slash `[batch, heads, n_slash]` offsets,
    best first; slots beyond a sequence's length are -1. KV-head groups run in steps (`lax.map`) whose fp32
    `[last_q, seq]` score rows stay under `ESTIMATE_BYTES` (all heads in one step at 128K; at 1M tokens and 32
    heads one step would hold 8 GiB per intermediate).
    """
    b, seq, h, d = q.shape
    kvh = k.shape[2]
    last_q = min(last_q, seq)
    rows = last_rows(lengths, last_q)
    q_last = jnp.take_along_axis(q, rows[:, :, None, None], axis=1).reshape(b, last_q, kvh, h // kvh, d)
    per_group = b * (h // kvh) * last_q * seq * 4
    step = max(n for n in range(1, kvh + 1) if kvh % n == 0 and (n == 1 or n * per_group <= ESTIMATE_BYTES))

    def some_groups(i):
        pick = lambda x: jax.lax.dynamic_slice_in_dim(x, i * step, step, axis=2)
        return _line_scores(pick(q_last), pick(k), rows, lengths, scale)  # [b, step, g, seq] each

    vertical, slash = jax.lax.map(some_groups, jnp.arange(kvh // step))  # [steps, b, step, g, seq]
    vertical, slash = (jnp.moveaxis(x, 0, 1).reshape(b, h, seq) for x in (vertical, slash))
    keys = jnp.arange(seq)
    valid_key = keys[None, None, :] < lengths[:, None, None]
    vertical = jnp.where(keys < ALWAYS_VERTICAL, jnp.inf, vertical)
    vertical = jnp.where(valid_key, vertical, -jnp.inf)
    slash = jnp.where(keys < ALWAYS_SLASH, jnp.inf, slash)
    slash = jnp.where(valid_key, slash, -jnp.inf)  # offsets < length
    v_score, v_idx = jax.lax.top_k(vertical, min(n_vertical, seq))
    s_score, s_idx = jax.lax.top_k(slash, min(n_slash, seq))
    return (
        jnp.where(v_score > -jnp.inf, v_idx, -1).astype(jnp.int32),
        jnp.where(s_score > -jnp.inf, s_idx, -1).astype(jnp.int32),
    )


def estimate_blocks(q: jax.Array, k: jax.Array, lengths: jax.Array, top_k: int, block_size: int = 64) -> jax.Array:
    """MInference's block-sparse estimate: top key blocks per query block by mean-pooled q.k.

    Returns int32 `[batch, heads, num_q_blocks, min(top_k, num_blocks)]`, best first, -1 for unused slots;
    each query block's own (diagonal) block is always included.
    """
    b, seq, h, d = q.shape
    kvh = k.shape[2]
    nb = -(-seq // block_size)
    pad = nb * block_size - seq
    pool = lambda x: (
        jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        .reshape(b, nb, block_size, x.shape[2], d)
        .mean(axis=2)
    )
    qp, kp = pool(q), pool(k)  # [b, nb, h|kvh, d]
    scores = jnp.einsum("bmkgd,bnkd->bkgmn", qp.reshape(b, nb, kvh, h // kvh, d), kp).reshape(b, h, nb, nb)
    blocks = jnp.arange(nb)
    causal = blocks[:, None] >= blocks[None, :]
    in_len = blocks[None, :] * block_size < lengths[:, None]  # key block holds a valid token
    ok = causal[None] & in_len[:, None, :]
    scores = jnp.where(ok[:, None], scores, -jnp.inf)
    scores = jnp.where((blocks[:, None] == blocks[None, :])[None, None], jnp.inf, scores)
    top, idx = jax.lax.top_k(scores, min(top_k, nb))
    return jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class MInference:
    """MInference sparse prefill with a per-(layer, head) `MInferenceConfig`; decode stays dense.

    slash_semantics: "exact" (lcjax's default: a slash offset d admits key i - d only) or "cover" (what
    MInference's own kernel computes: every key of the ranges its index builder merges from the slashes' 64-key
    windows, rounded up to whole 64-key steps; faster on scattered estimated slashes, see BENCHMARKS.md).
    """

    config: MInferenceConfig
    backend: Backend = "auto"
    slash_semantics: str = "exact"

    def pattern(self, q: jax.Array, k: jax.Array, meta) -> SparsePattern:
        b, seq, h, _ = q.shape
        table = self.config.table()
        kind_np, v_np, s_np = table["kind"], table["v"], table["s"]
        if kind_np.shape[1] != h:
            raise ValueError(f"MInference config has {kind_np.shape[1]} heads per layer; the model has {h}.")
        kind, v, s = (jnp.asarray(x)[meta.layer] for x in (kind_np, v_np, s_np))
        vs, stream, block = (kind == KINDS.index(name) for name in KINDS)
        # static slot counts: the largest budget any head of any layer asks for, clipped to the prompt
        vs_heads, stream_heads = kind_np == 0, kind_np == 1
        n_v = min(seq, max([ALWAYS_VERTICAL] + list(v_np[vs_heads]) + list(v_np[stream_heads])))
        n_s = min(seq, max([ALWAYS_SLASH] + list(s_np[vs_heads]) + list(s_np[stream_heads])))
        vertical = jnp.full((b, h, n_v), -1, jnp.int32)
        slash = jnp.full((b, h, n_s), -1, jnp.int32)
        if vs_heads.any():
            est_v, est_s = estimate_vertical_slash(q, k, meta.lengths, n_v, n_s, self.config.last_q, meta.scale)
            # MInference's floors: at least 30 columns and 50 diagonals per head
            vertical = jnp.where(vs[None, :, None], budget_mask(est_v, jnp.maximum(v, ALWAYS_VERTICAL)), vertical)
            slash = jnp.where(vs[None, :, None], budget_mask(est_s, jnp.maximum(s, 50)), slash)
        if stream_heads.any():
            ar_v, ar_s = jnp.arange(n_v, dtype=jnp.int32), jnp.arange(n_s, dtype=jnp.int32)
            vertical = jnp.where(stream[None, :, None], jnp.where(ar_v < v[:, None], ar_v, -1)[None], vertical)
            slash = jnp.where(stream[None, :, None], jnp.where(ar_s < s[:, None], ar_s, -1)[None], slash)
        blocks = None
        if (kind_np == 2).any():
            top_k = int(v_np[kind_np == 2].max())
            est = estimate_blocks(q, k, meta.lengths, top_k, self.config.block_size)
            est = jnp.where(jnp.arange(est.shape[-1])[None, None, None, :] < v[None, :, None, None], est, -1)
            blocks = jnp.where(block[None, :, None, None], est, -1)
        return SparsePattern(
            vertical, slash, blocks, block_size=self.config.block_size, slash_semantics=self.slash_semantics
        )

    def __call__(self, q, k, v, cache, meta):
        return sparse_prefill(q, k, v, cache, meta, self.pattern, self.backend)

    @classmethod
    def vertical_slash(
        cls,
        num_layers: int,
        num_heads: int,
        vertical_size: int = VERTICAL_SIZE,
        slash_size: int = SLASH_SIZE,
        backend: Backend = "auto",
        slash_semantics: str = "exact",
    ) -> "MInference":
        """Every head vertical-slash (SCBench's `minference` setting)."""
        config = MInferenceConfig.uniform(num_layers, num_heads, "vertical_and_slash", vertical_size, slash_size)
        return cls(config, backend, slash_semantics)

    @classmethod
    def block_sparse(
        cls, num_layers: int, num_heads: int, top_k: int = TOP_K, backend: Backend = "auto"
    ) -> "MInference":
        """Every head block-sparse: the top-k 64x64 key blocks of each query block by pooled q.k."""
        return cls(MInferenceConfig.uniform(num_layers, num_heads, "block_sparse", top_k, 0), backend)


SHIPPED_CONFIGS = {"smollm2-135m": "smollm2_135m.json"}


def shipped_config(model_name: str) -> MInferenceConfig:
    """A pattern config lcjax ships, searched by `experiments.minference_search` (docs/methods.md)."""
    if model_name not in SHIPPED_CONFIGS:
        raise ValueError(
            f"No shipped MInference config for {model_name!r}; shipped: {', '.join(SHIPPED_CONFIGS)}. "
            "Run `python -m experiments.minference_search --model ...` to make one."
        )
    return MInferenceConfig.from_json(Path(__file__).parent / "configs" / SHIPPED_CONFIGS[model_name])
