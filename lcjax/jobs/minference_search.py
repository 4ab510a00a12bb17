"""Runs MInference's kernel-aware pattern search on a model and writes the per-head config (MInference JSON).

    python -m experiments.minference_search [--model smollm2-135m] [--length 8000] [--max-error 0.05]
        [--out lcjax/methods/configs/smollm2_135m.json]

The calibration prompts are passkey prompts (seeds 1000+, not used by the accuracy benchmark) at the
model's longest context, with the needle at several depths; each head is judged by its worst prompt. Prints
the chosen pattern counts and mean recall.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

import lcjax
from lcjax.methods.minference_search import search_patterns
from lcjax.tasks.passkey import passkey_sample


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--max-error", type=float, default=0.05)
    p.add_argument("--tile-budget", type=float, default=1.0)
    p.add_argument("--question-rows", type=int, default=64, help="judge patterns on each prompt's last N rows")
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[0.1, 0.5, 0.9],
        help="needle depths of the calibration prompts (seeds 1000+, unused by the benchmark)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    model, tokenizer = lcjax.load_model(args.model, dtype=args.dtype)
    length = args.length or model.config.max_position_embeddings - 192
    samples = [passkey_sample(tokenizer, length, depth=d, seed=1000 + i) for i, d in enumerate(args.depths)]
    config, raw = search_patterns(
        model,
        [s.prompt_ids for s in samples],
        max_error=args.max_error,
        question_rows=args.question_rows,
        tile_budget=args.tile_budget,
    )
    kinds = collections.Counter((pt.kind, pt.v, pt.s) for layer in config.patterns for pt in layer)
    chosen = np.array([[pt.score for pt in layer] for layer in config.patterns])
    print(f"{len(samples)} calibration prompts of {len(samples[0].prompt_ids)} tokens; chosen: {dict(kinds)}")
    picked = np.array(
        [
            [[c.kind, c.v, c.s] == [pt.kind, pt.v, pt.s] for c in raw["candidates"]]
            for layer in config.patterns
            for pt in layer
        ]
    )
    cost = (raw["cost"].reshape(picked.shape) * picked).sum(-1)
    print(
        f"chosen patterns' recall: mean {chosen.mean():.3f}, min {chosen.min():.3f}; "
        f"mean tile cost {cost.mean():.3f} of causal tiles"
    )
    for c, cand in enumerate(raw["candidates"]):
        print(
            f"  candidate {cand.kind}({cand.v}, {cand.s}): recall {raw['recall'][..., c].mean():.3f}, "
            f"output error {raw['error'][..., c].mean():.3f}, tile cost {raw['cost'][..., c].mean():.3f}"
        )
    out = Path(args.out or f"lcjax/methods/configs/{str(args.model).replace('-', '_').replace('.', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
