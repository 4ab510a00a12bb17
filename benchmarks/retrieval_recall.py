"""Recall of RetrievalAttention's index on a real model's queries and keys, against faiss IVF / HNSW, Quest's pages
and exact top-k.

    python -m benchmarks.retrieval_recall [--model smollm2-135m] [--context 16384] [--queries 64]
        [--layers 2 8 14 20 26] [--corpus paul-graham-essays] [--out rows.jsonl] [--plot recall.png]

One forward over `--context` tokens of real text plus `--queries` more records every layer's rotated queries and
keys. The index of each (layer, KV head) holds the context's keys outside RetrievalAttention's GPU window (the
first 128 and last 512 tokens) and is built from the context's queries of that head's query group; the decode
queries are those of the `--queries` tokens that follow (each query head's own). Reported per method and
setting, averaged over the heads: recall@100 (the share of each query's true top 100 indexed keys that the
search returns), the share of indexed keys scanned (inner products computed; IVF counts its centroids too,
Quest its page bounds as two vectors a page), and the attention output's relative error when the query
attends to the window plus the returned keys instead of every key. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import lcjax
from lcjax.methods.retrieval_index import FaissIndex, FlatIndex, QueryGraphIndex, exact_top_k
from lcjax.models.attention import DenseAttention
from lcjax.models.transformer import forward
from lcjax.train.data import corpus_files, document_separator, read_documents, token_stream

SINK, RECENT, TOP = 128, 512, 100


@dataclasses.dataclass(frozen=True)
class _Record:
    """The model's own causal attention (cuDNN on a GPU) that also writes each layer's rotated q, k and v into the
    `cache` slot's arrays."""

    def __call__(self, q, k, v, rec, meta):
        out, _ = DenseAttention()(q, k, v, None, meta)
        rec = {name: rec[name].at[meta.layer].set(x[0].astype(jnp.float32)) for name, x in zip("qkv", (q, k, v))}
        return out, rec


def record_qkv(model, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated queries float32 `[layers, seq, heads, head_dim]`, keys and values `[layers, seq, kv_heads,
    head_dim]`."""
    c = model.config
    seq = tokens.shape[0]
    rec = dict(q=jnp.zeros((c.num_layers, seq, c.num_heads, c.head_dim), jnp.float32),
               k=jnp.zeros((c.num_layers, seq, c.num_kv_heads, c.head_dim), jnp.float32),
               v=jnp.zeros((c.num_layers, seq, c.num_kv_heads, c.head_dim), jnp.float32))  # fmt: skip

    @jax.jit
    def run(params, tokens, rec):
        positions = jnp.arange(seq, dtype=jnp.int32)[None]
        lengths = jnp.full((1,), seq, jnp.int32)
        _, rec = forward(params, c, tokens[None], positions, jnp.zeros((1,), jnp.int32), lengths, rec, "prefill",
                         _Record(), model.positions)  # fmt: skip
        return rec

    rec = run(model.params, jnp.asarray(tokens, jnp.int32), rec)
    return np.asarray(rec["q"]), np.asarray(rec["k"]), np.asarray(rec["v"])


def quest_ids(keys: np.ndarray, queries: np.ndarray, budget: int, page: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Quest's choice among the indexed keys: the `budget / page` pages of highest upper bound; all their keys."""
    n = keys.shape[0] // page * page
    pages = keys[:n].reshape(-1, page, keys.shape[1])
    kmin, kmax = pages.min(1), pages.max(1)
    bound = np.maximum(queries[:, None] * kmin[None], queries[:, None] * kmax[None]).sum(-1)  # [m, pages]
    top = np.argsort(-bound, axis=1)[:, : budget // page]
    ids = (top[..., None] * page + np.arange(page)).reshape(queries.shape[0], -1)
    return ids, np.full(queries.shape[0], 2 * pages.shape[0] + ids.shape[1])


def _attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """float64 softmax attention of one query `[d]` over `keys, values [n, d]`."""
    s = (keys.astype(np.float64) @ q) * scale
    p = np.exp(s - s.max())
    return p @ values / p.sum()


def full_attention(q, keys, values, window_k, window_v, scale) -> np.ndarray:
    """Each query's attention over the window and every indexed key, float64 `[m, d]` (the reference the
    retrieved outputs are compared with; computed once per head)."""
    all_k, all_v = np.concatenate([window_k, keys]), np.concatenate([window_v, values])
    return np.stack([_attention(qi, all_k, all_v, scale) for qi in q])


def attention_error(q, keys, values, window_k, window_v, ids, scale, full) -> np.ndarray:
    """Relative L2 error, per query, of attention over the window and `ids` against `full` (`full_attention`)."""
    errs = []
    for qi, sel, ref in zip(q, ids, full):
        sel = sel[sel >= 0]
        out = _attention(qi, np.concatenate([window_k, keys[sel]]), np.concatenate([window_v, values[sel]]), scale)
        errs.append(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return np.asarray(errs)


def methods(keys, train_q):
    """(name, setting, search function) for every method and setting measured."""
    graph = QueryGraphIndex(keys, train_q)
    ivf = FaissIndex(keys, "ivf")
    hnsw = FaissIndex(keys, "hnsw")
    flat = FlatIndex(keys)
    for beam in (100, 150, 200, 300, 500, 800):
        yield "lcjax graph", f"beam {beam}", lambda q, b=beam: graph.search(q, TOP, beam=b)
    for probes in (1, 2, 4, 8, 16, 32, 64):
        yield "faiss IVF", f"{probes} of {ivf._index.nlist} lists", lambda q, p=probes: _ivf(ivf, q, p)
    for ef in (100, 200, 400, 800):
        yield "faiss HNSW", f"ef {ef}", lambda q, e=ef: _hnsw(hnsw, q, e)
    for budget in (256, 512, 1024, 2048):
        yield "Quest pages", f"budget {budget}", lambda q, b=budget: quest_ids(keys, q, b)
    yield "exact top-k", "flat", lambda q: flat.search(q, TOP)


def _ivf(index, q, probes):
    index.probes = probes
    ids, scanned = index.search(q, TOP)
    return ids, scanned + index._index.nlist  # the centroids are scanned too


def _hnsw(index, q, ef):
    index.ef = ef
    return index.search(q, TOP)


def summary(rows: list[dict]) -> dict[tuple[str, str], np.ndarray]:
    """(method, setting) -> mean (recall, scanned, error) over the heads measured."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["setting"]), []).append((r["recall"], r["scanned"], r["error"]))
    return {key: np.mean(vals, axis=0) for key, vals in table.items()}


def plot(rows: list[dict], path: str, title: str) -> None:
    """Recall@100 against the share of keys scanned, one curve per method (its settings as points)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    means = summary(rows)
    for method in dict.fromkeys(name for name, _ in means):
        pts = sorted((sc, rec) for (name, _), (rec, sc, _) in means.items() if name == method)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.set(xscale="log", xlabel="keys scanned (%)", ylabel="recall@100", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: five spread over the depth")
    p.add_argument("--corpus", default="paul-graham-essays")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    model, tok = lcjax.load_model(a.model, dtype="bfloat16")
    c = model.config
    stream = token_stream([tok.encode(d, add_special_tokens=False) for d in read_documents(corpus_files(a.corpus))],
                          document_separator(tok))  # fmt: skip
    tokens = stream[: a.context + a.queries]
    t0 = time.perf_counter()
    q_all, k_all, v_all = record_qkv(model, tokens)
    print(f"recorded q, k of {len(tokens)} tokens in {time.perf_counter() - t0:.1f} s")
    layers = a.layers or [round(x) for x in np.linspace(1, c.num_layers - 2, 5)]
    group = c.num_heads // c.num_kv_heads
    lo, hi = SINK, a.context - RECENT
    rows = []
    for layer in layers:
        for kvh in range(c.num_kv_heads):
            heads = range(kvh * group, (kvh + 1) * group)
            keys, values = k_all[layer, lo:hi, kvh], v_all[layer, lo:hi, kvh]
            window = np.r_[0:lo, hi : a.context]
            window_k, window_v = k_all[layer, window, kvh], v_all[layer, window, kvh]
            train_q = q_all[layer, : a.context, heads.start : heads.stop].reshape(-1, c.head_dim)
            test_q = q_all[layer, a.context :, heads.start : heads.stop].transpose(1, 0, 2).reshape(-1, c.head_dim)
            truth = exact_top_k(keys, test_q, TOP)
            scale = c.head_dim**-0.5
            full = full_attention(test_q, keys, values, window_k, window_v, scale)
            t0 = time.perf_counter()
            found = list(methods(keys, train_q))
            build = time.perf_counter() - t0
            for name, setting, fn in found:
                ids, scanned = fn(test_q)
                recall = np.mean([len(np.intersect1d(i, t)) / TOP for i, t in zip(ids, truth)])
                error = attention_error(test_q, keys, values, window_k, window_v, ids, scale, full)
                row = dict(layer=layer, kv_head=kvh, method=name, setting=setting, recall=float(recall),
                           scanned=float(np.mean(scanned) / keys.shape[0]), error=float(np.mean(error)),
                           keys=keys.shape[0], build_s=build)  # fmt: skip
                rows.append(row)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
            print(f"layer {layer} kv head {kvh}: done ({build:.1f} s to build)")
    print("| method | setting | recall@100 | keys scanned | output error |\n|---|---|---|---|---|")
    for (name, setting), (rec, sc, err) in summary(rows).items():
        print(f"| {name} | {setting} | {rec:.3f} | {sc:.2%} | {err:.4f} |")
    if a.plot:
        plot(rows, a.plot, f"{a.model}, {a.context:,} tokens, layers {', '.join(map(str, layers))}")


if __name__ == "__main__":
    main()
