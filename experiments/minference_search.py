"""Runs MInference's kernel-aware pattern search on a model and writes the per-head config (MInference JSON).

    python -m experiments.minference_search [--model smollm2-135m] [--length 8000] [--min-recall 0.9]
        [--out lcjax/methods/configs/smollm2_135m.json]

The calibration prompt is a passkey prompt (seed 1000, not used by the accuracy benchmark) at the model's
longest context. Prints the chosen pattern counts and mean recall.
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
    p.add_argument("--min-recall", type=float, default=0.9)
    p.add_argument("--tile-budget", type=float, default=1.0)
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    model, tokenizer = lcjax.load_model(args.model, dtype=args.dtype)
    length = args.length or model.config.max_position_embeddings - 192
    sample = passkey_sample(tokenizer, length, depth=0.37, seed=1000)
    config, raw = search_patterns(model, sample.prompt_ids, min_recall=args.min_recall,
                                  tile_budget=args.tile_budget)
    kinds = collections.Counter((pt.kind, pt.v, pt.s) for layer in config.patterns for pt in layer)
    chosen = np.array([[pt.score for pt in layer] for layer in config.patterns])
    print(f"{len(sample.prompt_ids)}-token calibration prompt; chosen patterns: {dict(kinds)}")
    print(f"mean recall of chosen patterns {chosen.mean():.3f} (min {chosen.min():.3f})")
    for c, cand in enumerate(raw["candidates"]):
        print(f"  candidate {cand.kind}({cand.v}, {cand.s}): recall {raw['recall'][..., c].mean():.3f}, "
              f"tile cost {raw['cost'][..., c].mean():.3f}")
    out = Path(args.out or f"lcjax/methods/configs/{str(args.model).replace('-', '_').replace('.', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
