"""Passkey retrieval at the model's longest context: dense vs sparse-prefill methods, side by side.

    python -m experiments.minference_accuracy [--model smollm2-135m] [--length 8000] [--depths 10]
        [--methods dense a_shape tri_shape vertical_slash block_sparse minference] [--pattern-config PATH]

Every method prefills the same prompts (its sparse pattern), then decodes densely; the score is the share
of prompts whose answer contains the passkey. The tile column is the share of causal 64x64 tiles the
method's patterns visit on the first prompt (averaged over layers and heads): what a tiled kernel pays.
Prints a markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import lcjax
import lcjax.methods
from lcjax.generate import generate
from lcjax.methods import attention_method
from lcjax.methods.minference import SHIPPED_CONFIGS
from lcjax.methods.sparse_prefill import tile_costs
from lcjax.tasks.passkey import passkey_sample, passkey_score


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL)
    p.add_argument("--length", type=int, default=None, help="prompt tokens (default: context - 192)")
    p.add_argument("--depths", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "a_shape", "tri_shape", "vertical_slash", "block_sparse", "minference"],
    )
    p.add_argument("--pattern-config", default=None, help="MInference JSON for 'minference'")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    model, tokenizer = lcjax.load_model(args.model, dtype=args.dtype)
    length = args.length or model.config.max_position_embeddings - 192
    samples = [
        passkey_sample(tokenizer, length, d / max(1, args.depths - 1), seed)
        for seed in range(args.seeds)
        for d in range(args.depths)
    ]
    shipped = Path(lcjax.methods.__file__).parent / "configs" / SHIPPED_CONFIGS.get(str(args.model), "-")
    pattern_config = args.pattern_config or (str(shipped) if shipped.exists() else None)
    rows = []
    for name in args.methods:
        kw = {} if name == "dense" else {"backend": args.backend}
        if name == "minference":
            kw["pattern_config"] = pattern_config
        method = attention_method(name, model.config, **kw)
        m = model.with_transforms(attention=method)
        t0 = time.perf_counter()
        scores, answers = [], []
        for s in samples:
            (new,), _ = generate(m, s.prompt_ids, 12, stop_tokens=tokenizer.eos_token_ids)
            text = tokenizer.decode(new)
            scores.append(passkey_score(text, s.answer))
            answers.append(text.strip())
        cost = 1.0 if name == "dense" else float(tile_costs(model, method, samples[0].prompt_ids).mean())
        rows.append(
            dict(
                method=name,
                accuracy=float(np.mean(scores)),
                tile_cost=round(cost, 3),
                n=len(samples),
                prompt_tokens=int(np.mean([len(s.prompt_ids) for s in samples])),
                seconds=round(time.perf_counter() - t0, 1),
                example=answers[len(answers) // 2][:40],
            )
        )
        print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| method | passkey accuracy | causal 64x64 tiles computed | prompts | prompt tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['accuracy']:.0%} | {r['tile_cost']:.0%} | {r['n']} | {r['prompt_tokens']} |")


if __name__ == "__main__":
    main()
