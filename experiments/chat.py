"""Chat with a model: `python -m experiments.chat [--model smollm2-135m] [--prompt ...]`.

The built-in default answers one question with the real SmolLM2-135M-Instruct weights, on CPU or GPU.
"""

from __future__ import annotations

import argparse
import time

import lcjax
from lcjax.generate import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=lcjax.DEFAULT_MODEL,
                        help="built-in name, transformers checkpoint directory, or .gguf file")
    parser.add_argument("--prompt", action="append",
                        help="user message (repeatable: one answer each); default: two built-in questions")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]

    t0 = time.perf_counter()
    model, tokenizer = lcjax.load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        parser.error(f"{args.model} has no tokenizer files; chat needs one.")
    print(f"loaded {args.model} ({model.config.family}, {model.config.num_params() / 1e6:.0f}M params, "
          f"{args.dtype}) in {time.perf_counter() - t0:.1f}s")
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        t0 = time.perf_counter()
        (new,), _ = generate(model, ids, args.max_new_tokens, stop_tokens=tokenizer.eos_token_ids)
        seconds = time.perf_counter() - t0
        print(f"\nuser> {prompt}\nassistant> {tokenizer.decode(new).strip()}")
        print(f"   ({len(ids)} prompt tokens, {len(new)} new tokens, {seconds:.1f}s incl. compile)")


if __name__ == "__main__":
    main()
