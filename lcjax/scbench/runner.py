"""One SCBench example through a model in either shared-context mode, with the cache's whole lifecycle visible.

- multi-turn: the context and the first query are prefilled once; every later query is appended to the same
  cache after the earlier turns, with the gold answer standing as history (SCBench's "golden context"): the
  tokens a turn generates are cropped from the cache and the gold answer's tokens appended in their place.
  Whatever the model's cache transform does (compression, quantisation, page selection) stays applied.
- multi-request: the context alone is prefilled once; each query continues a copy of that cache (the
  returned cache is dropped), so every query sees the same compressed context.

Each turn records the tokens it prefilled, the cached tokens it reused, the slots the cache held afterwards
and the tokens seen, so cache reuse and compression are visible in the results.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import numpy as np

from lcjax.generate import CAPACITY_BUCKET, generate
from lcjax.scbench import prompts as prompts_lib
from lcjax.scbench.scoring import score_turn

Mode = Literal["multi-turn", "multi-request"]
MODES: tuple[Mode, ...] = ("multi-turn", "multi-request")


@dataclasses.dataclass(frozen=True)
class TurnResult:
    turn: int
    sub_task: str
    prediction: str
    answer: object
    score: float
    prefilled_tokens: int      # tokens fed to the model for this turn (history + query, or the whole prompt)
    reused_tokens: int         # cache slots this turn started from
    cache_tokens: int          # slots the cache held after the turn's prefill (after any compression)
    seen_tokens: int           # every token the sequence has seen (positions)
    new_tokens: int
    seconds: float


def _generate(model, ids: list[int], max_new_tokens: int, cache, stop_tokens):
    """generate() for one sequence; returns (new tokens, cache with them, slots before decoding)."""
    tokens, cache = generate(model, np.asarray([ids], np.int32), max_new_tokens, cache=cache,
                             stop_tokens=stop_tokens)
    new = tokens[0]
    return new, cache, int(cache.lengths[0]) - len(new)


def run_example(model, tokenizer, task: str, row: dict, mode: Mode, *, max_new_tokens_cap: int | None = None,
                max_seq_length: int | None = None) -> list[TurnResult]:
    """Every turn of `row` (SCBench's format) through `model` in `mode`; returns one `TurnResult` per turn.

    max_seq_length: cut the middle of the context so the first prompt fits what SCBench leaves it
    (`prompts.max_input_length`); max_new_tokens_cap: a ceiling on every turn's budget (quick runs)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    build = prompts_lib.multi_turn_prompts if mode == "multi-turn" else prompts_lib.multi_request_prompts
    prefix, turns = build(task, row)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    stops = tuple(tokenizer.eos_token_ids)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prefix_ids = bos + encode(prefix)
    if max_seq_length is not None:
        room = prompts_lib.max_input_length(task, max_seq_length, len(turns), mode)
        prefix_ids = prompts_lib.truncate_middle(prefix_ids, room - (len(encode(turns[0].text)) if mode ==
                                                                     "multi-turn" else 0))
    results: list[TurnResult] = []
    shared = None
    if mode == "multi-request":
        capacity = -(-len(prefix_ids) // CAPACITY_BUCKET) * CAPACITY_BUCKET
        _, shared = model.prefill(np.asarray([prefix_ids], np.int32), capacity=capacity, logits="last")
    cache, history = None, []
    for i, turn in enumerate(turns):
        budget = turn.max_new_tokens if max_new_tokens_cap is None else min(turn.max_new_tokens, max_new_tokens_cap)
        if mode == "multi-turn":
            ids = (prefix_ids if i == 0 else history) + encode(turn.text)
            start_cache = cache
        else:
            ids, start_cache = encode(turn.text), shared
        reused = 0 if start_cache is None else int(start_cache.lengths[0])
        t0 = time.perf_counter()
        new, out_cache, held = _generate(model, ids, budget, start_cache, stops)
        seconds = time.perf_counter() - t0
        prediction = tokenizer.decode(new).strip()
        results.append(TurnResult(i, turn.sub_task, prediction, turn.answer,
                                  score_turn(task, prediction, turn.answer, turn.raw),
                                  len(ids), reused, held, int(out_cache.positions[0]) - len(new), len(new),
                                  seconds))
        if mode == "multi-turn":
            # golden context: forget what the model generated; the gold answer goes in as history next turn
            cache = out_cache.crop(held)
            history = encode(turn.history)
    return results
