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
    score: float  # lcjax's scorer (`scoring.score_turn`)
    score_original: float  # compute_scores.py's, string answers per character (`original_quirks`)
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


def token_pieces(
    tokenizer,
    task: str,
    row: dict,
    mode: Mode,
    *,
    use_chat_template: bool = False,
    max_seq_length: int | None = None,
    disable_golden_context: bool = False,
) -> tuple[list[int] | None, list[list[int]], list]:
    """(shared context ids or None, ids each turn feeds, `prompts.Turn` per turn) for one example.

    multi-turn: turn 0 feeds the context and its query, turn i >= 1 the gold answer of turn i - 1 and its own
    query (with a chat template: the answer, end-of-turn, user header, query, assistant header, as
    `prompts.original_prompts` renders them), or the query alone with `disable_golden_context` (the model's own
    answer stays in the cache instead); no shared ids. multi-request: the shared ids are the context prompt,
    each turn feeds its query alone. The first prompt is encoded by the tokenizer's own rule (a BOS where it
    adds one, as SCBench's `tok.encode` does; a chat template that starts with BOS then gets two, as there),
    the others without special tokens. max_seq_length: the first prompt is cut in the middle to what SCBench
    leaves it (`prompts.max_input_length`); without a chat template only the context is cut, so the query
    survives whole."""
    if mode == "multi-turn":
        prefix, turns = prompts_lib.multi_turn_prompts(task, row, disable_golden_context=disable_golden_context)
    else:
        prefix, turns = prompts_lib.multi_request_prompts(task, row)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    room = (
        None
        if max_seq_length is None
        else prompts_lib.max_input_length(task, max_seq_length, len(turns), mode, [t.sub_task for t in turns])
    )
    cut = lambda ids, n: ids if n is None else prompts_lib.truncate_middle(ids, n)
    if use_chat_template:
        texts = prompts_lib.original_prompts(
            task, row, mode=mode, tokenizer=tokenizer, disable_golden_context=disable_golden_context
        )
        first = cut(tokenizer.encode(texts[0]), room)
        if mode == "multi-request":
            return first, [encode(t) for t in texts[1:]], turns
        return None, [first] + [encode(t) for t in texts[1:]], turns
    prefix_ids = tokenizer.encode(prefix)
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
    disable_golden_context: bool = False,
    needles: dict[str, list[tuple[str, str]]] | None = None,
) -> list[TurnResult]:
    """Every turn of `row` (SCBench's format) through `model` in `mode`; returns one `TurnResult` per turn.

    max_seq_length: cut the middle of the first prompt to what SCBench leaves it (`prompts.max_input_length`);
    max_new_tokens_cap: a ceiling on every turn's budget (quick runs); use_chat_template: SCBench's
    ``--use_chat_template`` prompts (the tokenizer's chat template; stops on its end-of-turn tokens too);
    disable_golden_context: SCBench's flag (multi-turn only): the model's own answers stay in the cache and
    the next turn feeds its query alone. As the original's decode loop leaves it, the cache then holds each
    answer but its last token (the stop token, or the budget's last token, never fed back), and a turn that ran
    out of budget has the tokenizer's EOS put in front of the next query. needles: repoqa's candidate functions
    per repository (`scoring.repoqa_needles` of every row evaluated, as the original collects them)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    shared_ids, turn_ids, turns = token_pieces(
        tokenizer,
        task,
        row,
        mode,
        use_chat_template=use_chat_template,
        max_seq_length=max_seq_length,
        disable_golden_context=disable_golden_context and mode == "multi-turn",
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
        eos = int(disable_golden_context)  # room for the EOS a turn may put in front of the next query
        capacity = _capacity(sum(padded_length(len(ids) + eos) + b for ids, b in zip(turn_ids, budgets)))
    cache = None
    eos_first = False
    for i, (turn, ids, budget) in enumerate(zip(turns, turn_ids, budgets)):
        if eos_first:
            ids = [tokenizer.eos_token_id] + ids
        start_cache = shared if shared is not None else cache
        reused = 0 if start_cache is None else int(start_cache.lengths[0])
        t0 = time.perf_counter()
        new, out_cache, held = _generate(model, ids, budget, start_cache, stops, capacity if i == 0 else None)
        seconds = time.perf_counter() - t0
        prediction = tokenizer.decode(new).strip()
        repo_needles = (needles or {}).get(row.get("repo"))
        score = lambda quirks: score_turn(
            task, prediction, turn.answer, turn.raw, needles=repo_needles, original_quirks=quirks
        )
        results.append(
            TurnResult(
                turn=i,
                sub_task=turn.sub_task,
                prediction=prediction,
                answer=turn.answer,
                score=score(False),
                score_original=score(True),
                prefilled_tokens=len(ids),
                reused_tokens=reused,
                cache_tokens=held,
                seen_tokens=int(out_cache.positions[0]) - len(new),
                new_tokens=len(new),
                seconds=seconds,
            )
        )
        if shared is None and disable_golden_context:
            cache = out_cache.crop(int(out_cache.lengths[0]) - 1)
            eos_first = len(new) == budget and new[-1] not in stops
        elif shared is None:
            # golden context: forget what the model generated; the next turn's ids start with the gold answer
            cache = out_cache.crop(held)
    return results
