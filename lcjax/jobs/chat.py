"""Chat with a model: `python -m experiments.chat [--model smollm2-135m] [--prompt ...]`.

The built-in default holds a two-turn conversation with the real SmolLM2-135M-Instruct weights, on CPU or GPU.
The conversation lives in one KV cache: each turn feeds only the tokens the cache does not hold yet (the
chat template is rendered in full, the cache is cropped to the longest prefix it shares with it, and the rest
is appended), so earlier turns are never recomputed. `--press snapkv --press-capacity 64` (or streamingllm,
pyramidkv) compresses the cache after every turn's prefill; later turns then read the compressed cache.
`--press kivi` keeps the cache in 2 bits, `--press quest` reads only the top pages at each decode step;
`--hyper-param '{"token_budget": 64}'` (SCBench's flag, JSON) sets any of a method's hyperparameters.
"""

from __future__ import annotations

import argparse
import json
import time

import lcjax
import lcjax.methods
from lcjax.generate import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=lcjax.DEFAULT_MODEL, help="built-in name, transformers checkpoint directory, or .gguf file"
    )
    parser.add_argument(
        "--prompt", action="append", help="user message (repeatable: one turn each); default: two built-in turns"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--press",
        default="dense",
        choices=sorted(lcjax.methods.CACHE_METHODS),
        help="KV-cache compression applied after each turn's prefill (SCBench's names)",
    )
    parser.add_argument(
        "--press-capacity",
        type=int,
        default=None,
        help="tokens the method keeps per layer (Quest: reads per step); default: the method's own",
    )
    parser.add_argument(
        "--press-window",
        type=int,
        default=None,
        help="observation window (SnapKV, PyramidKV); default: the method's own",
    )
    parser.add_argument(
        "--hyper-param",
        "--hyper_param",
        type=json.loads,
        default={},
        help="JSON dict of the cache method's hyperparameters (overrides the two above)",
    )
    args = parser.parse_args(argv)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about that city."]

    t0 = time.perf_counter()
    model, tokenizer = lcjax.load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        parser.error(f"{args.model} has no tokenizer files; chat needs one.")
    if args.press != "dense":
        window = {} if args.press_window is None else {"window_size": args.press_window}
        method = lcjax.methods.cache_method(args.press, budget=args.press_capacity, **{**window, **args.hyper_param})
        model = model.with_transforms(cache_transform=method)
        print(f"KV cache method: {model.cache_transform}")
    print(
        f"loaded {args.model} ({model.config.family}, {model.config.num_params() / 1e6:.0f}M params, "
        f"{args.dtype}) in {time.perf_counter() - t0:.1f}s"
    )
    messages, cached, cache, new = [], [], None, []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reused = shared_prefix(cached, ids)
        if cache is not None and reused < len(cached):
            # forget the cached tokens the re-rendered template does not share: they are the newest slots (a
            # press keeps its window and everything decoded since, in order, at the end of the cache)
            drop = len(cached) - reused
            if drop > len(new) + 1:
                raise RuntimeError(f"the chat template changed {drop} tokens of history; cannot reuse the cache.")
            cache = cache.crop(int(cache.lengths[0]) - drop)
        t0 = time.perf_counter()
        (new,), cache = generate(
            model, ids[reused:], args.max_new_tokens, cache=cache, stop_tokens=tokenizer.eos_token_ids
        )
        seconds = time.perf_counter() - t0
        answer = tokenizer.decode(new).strip()
        messages.append({"role": "assistant", "content": answer})
        cached = list(ids) + list(new)
        print(f"\nuser> {prompt}\nassistant> {answer}")
        print(
            f"   ({len(ids)} prompt tokens, {reused} of them reused from the cache, {len(new)} new tokens, "
            f"{seconds:.1f}s incl. compile; the cache holds {int(cache.lengths[0])} of "
            f"{int(cache.positions[0])} tokens seen)"
        )


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()
