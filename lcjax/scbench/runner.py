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
    prefilled_tokens: int  # tokens fed to the model for this turn (history + query, or the whole prompt)
    reused_tokens: int  # cache slots this turn started from
    cache_tokens: int  # slots the cache held after the turn's prefill (after any compression)
    seen_tokens: int  # every token the sequence has seen (positions)
    new_tokens: int
    seconds: float


def padded_length(n: int) -> int:
    """A turn's ids are right-padded to this many (the model masks the padding by its length), so turns of
    nearby lengths share one compiled prefill: powers of two from 64 to 1024, multiples of 1024 up to 8192,
    then of 4096 (at most 1/3 more tokens; a compile of a long model costs seconds, padding far less)."""
    if n <= 1024:
        return max(64, 1 << (n - 1).bit_length())
    step = 1024 if n <= 8192 else 4096
    return -(-n // step) * step


def _capacity(n: int) -> int:
    """Cache slots for n tokens, coarse enough that tasks of one --max_seq_length share compiled decode loops."""
    step = CAPACITY_BUCKET if n <= 4096 else 4096
    return -(-n // step) * step


def _padded(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One sequence as int32 `[1, padded_length]` right-padded with zeros, and its length `[1]`."""
    prompt = np.zeros((1, padded_length(len(ids))), np.int32)
    prompt[0, : len(ids)] = ids
    return prompt, np.asarray([len(ids)], np.int32)


def _generate(model, ids: list[int], max_new_tokens: int, cache, stop_tokens, capacity: int | None = None):
    """generate() for one sequence, its ids right-padded to `padded_length`; returns (new tokens, cache with
    them, slots before decoding)."""
    prompt, lengths = _padded(ids)
    tokens, cache = generate(
        model, prompt, max_new_tokens, cache=cache, lengths=lengths, stop_tokens=stop_tokens, capacity=capacity
    )
    new = tokens[0]
    return new, cache, int(cache.lengths[0]) - len(new)


def _bos(tokenizer, ids: list[int]) -> list[int]:
    """A BOS in front of the first prompt unless it starts with one already (a rendered chat template often
    does; the original's second BOS there is not reproduced)."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def token_pieces(
    tokenizer, task: str, row: dict, mode: Mode, *, use_chat_template: bool = False, max_seq_length: int | None = None
) -> tuple[list[int] | None, list[list[int]], list]:
    """(shared context ids or None, ids each turn feeds, `prompts.Turn` per turn) for one example.

    multi-turn: turn 0 feeds the context and its query, turn i >= 1 the gold answer of turn i - 1 and its own
    query (with a chat template: the answer, end-of-turn, user header, query, assistant header, as
    `prompts.original_prompts` renders them); no shared ids. multi-request: the shared ids are the context
    prompt, each turn feeds its query alone. max_seq_length: the first prompt is cut in the middle to what
    SCBench leaves it (`prompts.max_input_length`); without a chat template only the context is cut, so the
    query survives whole."""
    build = prompts_lib.multi_turn_prompts if mode == "multi-turn" else prompts_lib.multi_request_prompts
    prefix, turns = build(task, row)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    room = (
        None
        if max_seq_length is None
        else prompts_lib.max_input_length(task, max_seq_length, len(turns), mode, [t.sub_task for t in turns])
    )
    cut = lambda ids, n: ids if n is None else prompts_lib.truncate_middle(ids, n)
    if use_chat_template:
        texts = prompts_lib.original_prompts(task, row, mode=mode, tokenizer=tokenizer)
        first = cut(_bos(tokenizer, encode(texts[0])), room)
        if mode == "multi-request":
            return first, [encode(t) for t in texts[1:]], turns
        return None, [first] + [encode(t) for t in texts[1:]], turns
    prefix_ids = _bos(tokenizer, encode(prefix))
    if mode == "multi-request":
        return cut(prefix_ids, room), [encode(t.text) for t in turns], turns
    query0 = encode(turns[0].text)
    first = cut(prefix_ids, None if room is None else room - len(query0)) + query0
    return None, [first] + [encode(turns[i - 1].history) + encode(t.text) for i, t in enumerate(turns) if i], turns


def run_example(
    model,
    tokenizer,
    task: str,
    row: dict,
    mode: Mode,
    *,
    max_new_tokens_cap: int | None = None,
    max_seq_length: int | None = None,
    use_chat_template: bool = False,
) -> list[TurnResult]:
    """Every turn of `row` (SCBench's format) through `model` in `mode`; returns one `TurnResult` per turn.

    max_seq_length: cut the middle of the first prompt to what SCBench leaves it (`prompts.max_input_length`);
    max_new_tokens_cap: a ceiling on every turn's budget (quick runs); use_chat_template: SCBench's
    ``--use_chat_template`` prompts (the tokenizer's chat template; stops on its end-of-turn tokens too)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    shared_ids, turn_ids, turns = token_pieces(
        tokenizer, task, row, mode, use_chat_template=use_chat_template, max_seq_length=max_seq_length
    )
    stops = tuple(tokenizer.eos_token_ids)
    results: list[TurnResult] = []
    budgets = [
        turn.max_new_tokens if max_new_tokens_cap is None else min(turn.max_new_tokens, max_new_tokens_cap)
        for turn in turns
    ]
    shared = None
    if shared_ids is not None:
        # room for the longest query and its answer, so no query grows (copies) the shared cache
        room = max(padded_length(len(ids)) + b for ids, b in zip(turn_ids, budgets))
        prompt, lengths = _padded(shared_ids)
        _, shared = model.prefill(prompt, lengths, capacity=_capacity(prompt.shape[1] + room), logits="last")
        capacity = None
    else:  # room for every turn from the start: a dense cache is never grown (a copy and a compile)
        capacity = _capacity(sum(padded_length(len(ids)) + b for ids, b in zip(turn_ids, budgets)))
    cache = None
    for i, (turn, ids, budget) in enumerate(zip(turns, turn_ids, budgets)):
        start_cache = shared if shared is not None else cache
        reused = 0 if start_cache is None else int(start_cache.lengths[0])
        t0 = time.perf_counter()
        new, out_cache, held = _generate(model, ids, budget, start_cache, stops, capacity if i == 0 else None)
        seconds = time.perf_counter() - t0
        prediction = tokenizer.decode(new).strip()
        results.append(
            TurnResult(
                i,
                turn.sub_task,
                prediction,
                turn.answer,
                score_turn(task, prediction, turn.answer, turn.raw),
                len(ids),
                reused,
                held,
                int(out_cache.positions[0]) - len(new),
                len(new),
                seconds,
            )
        )
        if shared is None:
            # golden context: forget what the model generated; the next turn's ids start with the gold answer
            cache = out_cache.crop(held)
    return results
