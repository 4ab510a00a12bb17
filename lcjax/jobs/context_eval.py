"""Context extension measured: sliding-window perplexity and passkey accuracy at several lengths, per RoPE method.

    python -m experiments.context_eval [--model smollm2-135m] --target-length 32768
        [--lengths 8192 16384 32768] [--methods original pi ntk dynamic yarn longrope=FACTORS.json]
        [--corpus python-stdlib] [--windows 4] [--passkeys 5] [--output runs/context_eval.jsonl]

Each method extends the model's plain RoPE from its trained context to `--target-length` (PI "pi", static NTK
"ntk", dynamic NTK "dynamic", YaRN "yarn"), or applies LongRoPE factors written by `experiments.longrope`
("longrope=PATH"); "original" is the model as loaded (for a model exported by `experiments.longrope`, its own
LongRoPE scaling, fine-tuned or not). Perplexity is measured on the held-out documents of `--corpus` (the split
`experiments.finetune` and `experiments.longrope` hold out with the same --held-out and --seed), joined into one
stream, in windows of each length (`lcjax.train.perplexity`); passkey accuracy is the share of `--passkeys`
prompts of each length, the key at depths spread over the prompt, whose greedy answer contains the key; `--kv`
does the same for key-value retrieval (`lcjax.tasks.kv_retrieval`: the value of one UUID key in a JSON object).

Rows go to `--output` (JSON lines) as they are measured; a rerun with the same file skips what it holds. A
markdown table is printed last, and `--plot PNG` draws perplexity against length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

import lcjax
from lcjax.config import ModelConfig, extend_context
from lcjax.generate import generate
from lcjax.tasks.kv_retrieval import kv_sample
from lcjax.tasks.passkey import passkey_sample, passkey_score
from lcjax.train.data import (
    BUILTIN_CORPORA,
    corpus_files,
    document_separator,
    read_documents,
    split_documents,
    token_stream,
)
from lcjax.train.longrope_search import apply_factors, read_factors
from lcjax.train.perplexity import perplexity, sliding_windows, window_losses

METHOD_NAMES = ("original", "pi", "ntk", "dynamic", "yarn", "longrope=PATH")
# the name on the command line -> extend_context's
_SCALINGS = {"pi": "linear", "ntk": "ntk", "dynamic": "dynamic", "yarn": "yarn"}


def method_config(config: ModelConfig, method: str, target_length: int) -> ModelConfig:
    """`config` under `method` (one of METHOD_NAMES) for contexts up to `target_length`."""
    if method == "original":
        return config
    if method.startswith("longrope="):
        return apply_factors(config, read_factors(method.partition("=")[2]))
    if method not in _SCALINGS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}.")
    factor = target_length / config.max_position_embeddings
    return extend_context(config, _SCALINGS[method], factor)


def held_out_stream(corpus: str, tokenizer, held_out: float, seed: int) -> np.ndarray:
    """The held-out documents of `corpus`, tokenised and joined (each followed by end-of-sequence), int32 `[n]`."""
    _, docs = split_documents(read_documents(corpus_files(corpus)), held_out, seed)
    return token_stream([tokenizer.encode(d, add_special_tokens=False) for d in docs], document_separator(tokenizer))


# metric -> (the sample maker, tokens an answer may take)
RETRIEVAL = {"passkey": (passkey_sample, 12), "kv": (kv_sample, 40)}


def retrieval_answers(
    model: lcjax.Transformer, tokenizer, metric: str, length: int, samples: int
) -> list[tuple[str, str]]:
    """(greedy answer, expected answer) for `samples` prompts of about `length` tokens, answers at depths spread
    evenly: passkey ("passkey") or key-value retrieval ("kv")."""
    make, budget = RETRIEVAL[metric]
    made = [make(tokenizer, length - budget - 8, i / max(1, samples - 1), seed=i) for i in range(samples)]
    # every prompt padded to the longest (templates overshoot the target by a few tokens): one compile per length
    prompt = np.zeros((1, max(len(s.prompt_ids) for s in made)), np.int32)
    out = []
    for s in made:
        prompt[0] = 0
        prompt[0, : len(s.prompt_ids)] = s.prompt_ids
        lengths = np.asarray([len(s.prompt_ids)], np.int32)
        (new,), _ = generate(model, prompt, budget, lengths=lengths, stop_tokens=tokenizer.eos_token_ids)
        out.append((tokenizer.decode(new), s.answer))
    return out


def retrieval_accuracy(model: lcjax.Transformer, tokenizer, metric: str, length: int, samples: int) -> float:
    """Share of `retrieval_answers` whose greedy answer contains the expected one."""
    return float(
        np.mean(
            [passkey_score(got, want) for got, want in retrieval_answers(model, tokenizer, metric, length, samples)]
        )
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL, help="built-in name, transformers directory or .gguf")
    p.add_argument("--target-length", type=int, required=True, help="the context the methods extend to")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default: the trained context up to the target")
    p.add_argument(
        "--methods", nargs="+", default=["original", "pi", "ntk", "dynamic", "yarn"], help=", ".join(METHOD_NAMES)
    )
    p.add_argument(
        "--corpus", default="python-stdlib", help=f"a file, a directory or one of {', '.join(BUILTIN_CORPORA)}"
    )
    p.add_argument("--held-out", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per length (at most)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: side by side)")
    p.add_argument("--passkeys", type=int, default=5, help="passkey prompts per length (0: none)")
    p.add_argument("--kv", type=int, default=0, help="key-value retrieval prompts per length (0: none)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--output", default="runs/context_eval.jsonl")
    p.add_argument("--plot", default=None, help="draw perplexity against length into this PNG")
    a = p.parse_args(argv)
    if a.target_length < 2 or a.windows < 1 or a.passkeys < 0 or a.kv < 0:
        p.error("--target-length >= 2, --windows >= 1, --passkeys >= 0 and --kv >= 0 are needed.")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    model, tok = lcjax.load_model(a.model, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; perplexity of text and passkeys need one.")
    native = model.config.max_position_embeddings
    lengths = a.lengths or sorted({native, *[native * 2**i for i in range(1, 8) if native * 2**i <= a.target_length],
                                   a.target_length})  # fmt: skip
    configs = {}
    for method in a.methods:
        try:
            configs[method] = method_config(model.config, method, a.target_length)
        except ValueError as e:
            raise SystemExit(f"--methods {method}: {e}") from None
    try:
        stream = held_out_stream(a.corpus, tok, a.held_out, a.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--corpus {a.corpus}: {e}") from None
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["method"], r["metric"], r["length"])] = r
    counts = {"perplexity": a.windows, "passkey": a.passkeys, "kv": a.kv}
    jobs = [(m, metric, n) for m in a.methods for n in lengths for metric in counts if counts[metric]]
    with open(out, "a") as log:
        for method, metric, length in tqdm(jobs, desc="context eval", unit="measure"):
            key = (str(a.model), method, metric, length)
            if key in done:
                continue
            m = dataclasses.replace(model, config=configs[method], positions=None)  # positions from the config
            if metric == "perplexity":
                try:
                    windows, scored = sliding_windows(stream, length, a.stride, tok.bos_token_id, a.windows)
                except ValueError as e:
                    raise SystemExit(f"--corpus {a.corpus} at {length} tokens: {e}") from None
                value, n = perplexity(window_losses(m, windows, scored)), len(windows)
            else:
                value, n = retrieval_accuracy(m, tok, metric, length, counts[metric]), counts[metric]
            row = dict(model=str(a.model), method=method, metric=metric, length=length, value=value, n=n,
                       corpus=a.corpus)  # fmt: skip
            done[key] = row
            log.write(json.dumps(row) + "\n")
            log.flush()
    rows = [done[(str(a.model), m, metric, n)] for m, metric, n in jobs]
    print(table(rows, lengths))
    if a.plot:
        plot(rows, Path(a.plot))


def table(rows: list[dict], lengths: list[int]) -> str:
    """Markdown: one line per method, and per length its perplexity / passkey accuracy / kv accuracy (those
    measured)."""
    cells = {(r["method"], r["length"], r["metric"]): r["value"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = [m for m in ("perplexity", "passkey", "kv") if any(r["metric"] == m for r in rows)]
    lines = [f"| method ({' / '.join(metrics)}) | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]  # fmt: skip
    for m in methods:
        parts = []
        for n in lengths:
            values = [cells.get((m, n, metric)) for metric in metrics]
            parts.append(" / ".join("" if v is None else f"{v:.2f}" if metric == "perplexity" else f"{v:.0%}"
                                    for v, metric in zip(values, metrics)))  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["length"], r["value"]) for r in rows if r["method"] == method and r["metric"] == "perplexity")
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside: curves bunch up low
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
