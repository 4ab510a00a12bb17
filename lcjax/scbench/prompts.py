"""SCBench prompts per task and mode, built as SCBench's own code builds them (microsoft/MInference
`scbench/eval_utils.py` and `scbench/run_scbench.py`; the template strings are reproduced because the prompts
must be identical, the code here is this repository's own).

What follows which original piece:

- `TEMPLATES`: per task, the first-turn template (`multiturn_templates`), the follow-up template fed with the
  gold answer in front (`multiturn_follow_up_templates`, ``"{pre_ans}\\n\\n..."``), and the follow-up without
  it (`multiturn_follow_up_templates_in_chat_tempate`), which is also the query of the multi-request mode and
  of every chat-template follow-up. The multi-request context (`multiturn_templates_scdq`) is the first-turn
  template cut after ``{context}`` (true for every task here).
- `MAX_NEW_TOKENS` / `SUB_TASK_MAX_NEW_TOKENS` / `max_new_tokens`: `DATA_NAME_TO_MAX_NEW_TOKENS`; the
  multi-task sets look the budget up by the turn's ``task`` tag, as `GreedySearch.test` does.
- `multi_turn_prompts`: `create_multiturn_prompt` with `use_chat_template=False` (the default mode,
  "golden context": turn i >= 1 is ``"{pre_ans}\\n\\n{query}"`` with the previous turn's gold answer, fed
  after the previous turn's prompt while the tokens the model generated are dropped from the cache).
- `multi_request_prompts`: `create_scdq_prompt` with `use_chat_template=False` (`--same_context_different_query`:
  the context prompt is encoded once; each query's ids are appended to it alone, with no separator text).
- `chat_messages` / `multi_request_chat_messages` / `original_prompts(..., tokenizer=...)`: the
  `use_chat_template=True` branches of both functions (see `original_prompts` for how the rendered strings
  are cut).
- `max_input_length` / `truncate_middle`: `run_scbench.py`'s input budget and `truncate_input` (the first
  prompt, prompts[0], is cut in the middle to that many tokens).

Rendering details the original implies: a context or answer that is not a string is rendered by
``str.format``, i.e. ``str(x)`` (mf's list of ints -> ``"[3, 1, 2]"``, an int answer -> ``"7"``, vt's list
answer -> ``"['AB', 'CD']"``); a row without ``context`` uses ``row["input"]`` (as the generic branch does);
choice_eng's first four ``options`` are rendered as ``"A. ..\\nB. ..\\nC. ..\\nD. .."``; mf's question prefix is
``"What is <x>?"`` with ``<x>`` = the first ``r"The .+ is"`` match of the turn's input, lower-cased, minus its
last three characters (``" is"``).

Splitting into token pieces: `multi_turn_prompts` returns the shared prefix (the context part) and per turn
the text to append, so that ``prefix + turn0.text`` is the original's first prompt and
``answer_{i-1} + turn_i.text`` its i-th follow-up (`full_text` concatenates them). A runner that tokenises
the prefix, each turn's text and each answer separately and appends them to the KV cache may get token
boundaries that differ slightly from tokenising the whole string at once (the original itself tokenises
prompts[0] with special tokens, i.e. a BOS, and each follow-up string, answer included, with
``add_special_tokens=False``); `original_prompts` gives the original's exact per-turn strings for a runner
that wants its tokenisation.

Original quirks kept on purpose (all documented where they apply):

- choice_eng's first turn and every query without the golden answer end ``"The the correct answer is"``,
  while the golden-context follow-up ends ``"The letter of the correct answer is"``.
- mf in multi-request mode puts the first turn's whole input (not ``"What is ..?"``) in front of the context.
- mf with a chat template: every follow-up's user message uses the *last* turn's ``"What is ..?"`` prefix
  (the original's list comprehension reads the loop variable left by the loop above it);
  ``original_quirks=False`` uses each turn's own.
- summary with a chat template: ``"This paper"`` is appended after every rendered follow-up (not the first
  turn, not summary_with_needles).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lcjax.scbench.data import TASKS
from lcjax.scbench.scoring import sub_task as _scoring_sub_task

Mode = Literal["multi-turn", "multi-request"]
MODES: tuple[Mode, ...] = ("multi-turn", "multi-request")

# ------------------------------------------------------------------------------------------ budgets

MAX_NEW_TOKENS: dict[str, int] = {
    "scbench_kv": 150,
    "scbench_prefix_suffix": 150,
    "scbench_vt": 30,
    "scbench_mf": 5,
    "scbench_passkey": 15,
    "scbench_many_shot": 10,
    "scbench_qa_eng": 40,
    "scbench_qa_chn": 40,
    "scbench_choice_eng": 40,
    "scbench_summary": 200,
    "scbench_repoqa": 1024,
}
"""Max new tokens per single task (and the passkey sub-task's own entry), as `DATA_NAME_TO_MAX_NEW_TOKENS`."""

SUB_TASK_MAX_NEW_TOKENS: dict[str, dict[str, int]] = {
    "scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
    "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80},
}
"""Max new tokens per sub-task of the multi-task sets (differs from the standalone tasks: summary 800, kv 80)."""

# ------------------------------------------------------------------------------------------ templates

_GENERIC_FOLLOW_UPS = ("{pre_ans}\n\n{input}", "{input}")
_CHOICE_BLOCK = "Question: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"


@dataclass(frozen=True)
class Templates:
    """One task's templates: `first` (context + first query), `golden` (a follow-up after the previous
    gold answer, starting ``{pre_ans}``), `plain` (a query alone: multi-request, chat follow-ups, and
    follow-ups with the golden context disabled)."""

    first: str
    golden: str
    plain: str


def _generic(head: str = "") -> Templates:
    return Templates(head + "{context}\n\n{input}", *_GENERIC_FOLLOW_UPS)


TEMPLATES: dict[str, Templates] = {
    "scbench_kv": _generic("Extract the value corresponding to the specified key in the JSON object below.\n\n"),
    "scbench_prefix_suffix": _generic(),
    "scbench_vt": _generic(),
    "scbench_repoqa": _generic(
        "Based on the function description and code context, please retrieve and repeat "
        "the exact described function from the code context in a code block wrapped by "
        "```:\n\n"
    ),
    "scbench_qa_eng": Templates(
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
        "Question: {question}\nAnswer:",
        "{pre_ans}\n\nQuestion: {question}\nAnswer:",
        "Question: {question}\nAnswer:",
    ),
    "scbench_qa_chn": Templates(
        "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
        "{pre_ans}\n\n问题：{question}\n答案：",
        "问题：{question}\n答案：",
    ),
    "scbench_choice_eng": Templates(
        "Read the book and answer the question.\n\n{context}\n\n" + _CHOICE_BLOCK + "The the correct answer is",
        "{pre_ans}\n\n" + _CHOICE_BLOCK + "The letter of the correct answer is",
        _CHOICE_BLOCK + "The the correct answer is",
    ),
    "scbench_many_shot": _generic(),
    "scbench_mf": Templates(
        "{prefix}\n\n{context}\n\n{input}", "{pre_ans}\n\n{prefix}\n\n{input}", "{prefix}\n\n{input}"
    ),
    "scbench_summary": _generic(),
    "scbench_summary_with_needles": _generic(),
    "scbench_repoqa_and_kv": _generic(),
}
"""Per task, the original's templates (see the module docstring for which dict each field comes from)."""

assert set(TEMPLATES) == set(TASKS)

SCDQ_DELIMITER = "[SEPSEPSEP]"
"""The marker `create_scdq_prompt` renders into chat messages and splits the rendered text at."""

CHAT_SUMMARY_SUFFIX = "This paper"
"""Appended after every rendered chat follow-up of scbench_summary."""

_CONTEXT_SLOT = "{context}"
_PRE_ANS_SLOT = "{pre_ans}"
_MF_TARGET = re.compile(r"The .+ is")


def _check_task(task: str) -> None:
    if task not in TEMPLATES:
        raise ValueError(f"Unknown SCBench task {task!r}; known tasks: {', '.join(TASKS)}.")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def _turns_of(task: str, row: Mapping) -> list[Mapping]:
    turns = row.get("multi_turns")
    if not isinstance(turns, Sequence) or not turns:
        raise ValueError(
            f"{task}: the row has no multi_turns (SCBench's format: "
            f"{{id, context, multi_turns: [{{input, answer, ...}}]}})."
        )
    return list(turns)


# ------------------------------------------------------------------------------------------ pieces


def sub_task(task: str, turn: Mapping | None = None) -> str:
    """The task a turn is budgeted and scored as: `task`, or the multi-task sets' ``turn["task"]`` tag
    (`lcjax.scbench.scoring.sub_task`). ValueError for an unknown task or a missing / foreign tag."""
    _check_task(task)
    return _scoring_sub_task(task, turn)


def max_new_tokens(task: str, turn: Mapping | None = None) -> int:
    """Max new tokens for one turn (a ``multi_turns`` entry; needed for the multi-task sets, whose budget
    follows the turn's sub-task)."""
    name = sub_task(task, turn)
    if task in SUB_TASK_MAX_NEW_TOKENS:
        return SUB_TASK_MAX_NEW_TOKENS[task][name]
    return MAX_NEW_TOKENS[name]


def answer_text(answer: Any) -> str:
    """An answer as the original writes it into a prompt (``"{pre_ans}".format(...)``, i.e. ``str``)."""
    return f"{answer}"


def render_context(row: Mapping) -> str:
    """The row's context as the templates render it: ``str(context)`` (mf's list of ints -> ``"[1, 2]"``);
    ``row["input"]`` when the row has no ``context``."""
    return f"{row['context'] if 'context' in row else row['input']}"


def render_options(options: Sequence[Any]) -> str:
    """choice_eng's options as the template writes them: ``"A. <o0>\\nB. <o1>\\nC. <o2>\\nD. <o3>"`` (the
    first four; fewer is a ValueError, where the original would fail with IndexError)."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", _four_options(options)))


def _four_options(options: Any) -> list[Any]:
    if not isinstance(options, Sequence) or isinstance(options, str) or len(options) < 4:
        raise ValueError(f"scbench_choice_eng: a turn needs a list of (at least) four options, got {options!r}.")
    return list(options[:4])


def mf_question(turn_input: str) -> str:
    """mf's question prefix: ``"What is <x>?"``, <x> the first ``r"The .+ is"`` match of the input, lower-cased,
    without its trailing ``" is"`` (``"... The largest number of the list is: "`` -> ``"What is the largest
    number of the list?"``)."""
    found = _MF_TARGET.findall(turn_input)
    if not found:
        raise ValueError(f"scbench_mf: the turn input has no 'The ... is' phrase to ask about: {turn_input!r}.")
    return f"What is {found[0].lower()[:-3]}?"


def _fields(task: str, row: Mapping, turn: Mapping, *, pre_ans: Any = None, prefix: str | None = None) -> dict:
    """The template fields for one turn (str.format ignores the ones a template does not use)."""
    out = {"context": render_context(row), "input": turn["input"], "question": turn["input"], "pre_ans": pre_ans}
    if task == "scbench_choice_eng":
        out.update(zip(("OPTION_A", "OPTION_B", "OPTION_C", "OPTION_D"), _four_options(turn.get("options"))))
    if task == "scbench_mf":
        out["prefix"] = mf_question(turn["input"]) if prefix is None else prefix
    return out


def _split_at_context(template: str) -> tuple[str, str]:
    cut = template.index(_CONTEXT_SLOT) + len(_CONTEXT_SLOT)
    return template[:cut], template[cut:]


def _after_pre_ans(template: str) -> str:
    assert template.startswith(_PRE_ANS_SLOT), template
    return template[len(_PRE_ANS_SLOT) :]


# ------------------------------------------------------------------------------------------ turns


@dataclass(frozen=True)
class Turn:
    """One query of an example.

    text: the new text to feed for this turn: in multi-turn mode, after the shared prefix (turn 0) or after
      the previous turn's `history` (turns >= 1); in multi-request mode, after the shared prefix alone.
    max_new_tokens: this turn's generation budget (its sub-task's for the multi-task sets).
    answer: the gold answer as stored in the data (str, int or list).
    sub_task: the task the turn is scored and budgeted as.
    history: the text standing for this turn's answer before the next turn's text in multi-turn mode (the
      gold answer as the original writes it, or the `golden_history` entry); "" where nothing is fed (the
      multi-request mode, and multi-turn with the golden context disabled, where the model's own tokens stay).
    raw: the row's ``multi_turns`` entry (options, task tag, function name: what scoring reads).
    """

    text: str
    max_new_tokens: int
    answer: Any
    sub_task: str
    history: str = ""
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)


def multi_turn_prompts(
    task: str, row: Mapping, *, golden_history: Sequence[Any] | None = None, disable_golden_context: bool = False
) -> tuple[str, list[Turn]]:
    """(shared prefix, turns) of `create_multiturn_prompt` without a chat template.

    The prefix is the first-turn template up to and including the context (e.g. kv: the instruction,
    ``"\\n\\n"``, the context); turn 0's text is the rest of it (``"\\n\\n" + query``); turn i >= 1's text is
    the golden follow-up template after ``{pre_ans}`` (``"\\n\\n" + query``; choice_eng's ends ``"The letter
    of the correct answer is"``). So ``prefix + t0.text + t0.history + t1.text + ...`` (`full_text`) is what
    the original feeds, turn by turn, the gold answers standing as history.

    golden_history: texts standing for the turns' answers (one per turn, or one per turn but the last);
    default the gold answers as the original writes them (`answer_text`). disable_golden_context: the
    original's ``--disable_golden_context``: turns >= 1 are the plain queries (no separator, no answer; the
    model's own generated tokens, plus an EOS when generation did not end with one, stay in the cache).
    """
    _check_task(task)
    turns_in = _turns_of(task, row)
    if golden_history is not None and len(golden_history) < len(turns_in) - 1:
        raise ValueError(
            f"golden_history has {len(golden_history)} entries; {len(turns_in) - 1} or more "
            f"are needed for {len(turns_in)} turns."
        )
    t = TEMPLATES[task]
    head, first_rest = _split_at_context(t.first)
    prefix = head.format(**_fields(task, row, turns_in[0]))
    out = []
    for i, turn in enumerate(turns_in):
        fields = _fields(task, row, turn)
        if i == 0:
            text = first_rest.format(**fields)
        elif disable_golden_context:
            text = t.plain.format(**fields)
        else:
            text = _after_pre_ans(t.golden).format(**fields)
        if disable_golden_context:
            history = ""
        elif golden_history is not None and i < len(golden_history):
            history = answer_text(golden_history[i])
        else:
            history = answer_text(turn["answer"])
        out.append(Turn(text, max_new_tokens(task, turn), turn["answer"], sub_task(task, turn), history, turn))
    return prefix, out


def multi_request_prompts(task: str, row: Mapping) -> tuple[str, list[Turn]]:
    """(shared context, queries) of `create_scdq_prompt` without a chat template: the context prompt is encoded
    once and every query's text is appended to it alone. The original concatenates the two token lists with
    no separator text (kv: ``"...JSON data:\\n{...}"`` then ``"Key: ..."``). mf's context prompt starts with
    the first turn's whole input (the original's ``prefix=eg["multi_turns"][0]["input"]``); its queries are
    ``"What is <x>?\\n\\n" + input``."""
    _check_task(task)
    turns_in = _turns_of(task, row)
    t = TEMPLATES[task]
    head, _ = _split_at_context(t.first)
    prefix = head.format(**_fields(task, row, turns_in[0], prefix=turns_in[0]["input"]))
    turns = [
        Turn(
            t.plain.format(**_fields(task, row, turn)),
            max_new_tokens(task, turn),
            turn["answer"],
            sub_task(task, turn),
            "",
            turn,
        )
        for turn in turns_in
    ]
    return prefix, turns


def full_text(prefix: str, turns: Sequence[Turn], answers: Sequence[Any] | None = None, upto: int | None = None) -> str:
    """The multi-turn text up to and including turn `upto`'s query (default: the last turn):
    ``prefix + turns[0].text + answers[0] + turns[1].text + ... + turns[upto].text``. answers default to the
    turns' `history`; a non-string answer is written as `answer_text` does. For checking: a runner
    tokenises the pieces separately (see the module docstring)."""
    upto = len(turns) - 1 if upto is None else upto
    if not 0 <= upto < len(turns):
        raise ValueError(f"upto={upto} is not a turn index (0..{len(turns) - 1}).")
    parts = [prefix]
    for i in range(upto + 1):
        if i:
            parts.append(turns[i - 1].history if answers is None else answer_text(answers[i - 1]))
        parts.append(turns[i].text)
    return "".join(parts)


# ------------------------------------------------------------------------------------------ chat template


class ChatTokenizer(Protocol):
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = ...,
        tokenize: bool = ...,
        **kwargs: Any,
    ) -> Any: ...


def chat_messages(
    task: str,
    row: Mapping,
    turn_index: int,
    history: Sequence[Any] | None = None,
    *,
    disable_golden_context: bool = False,
    original_quirks: bool = True,
) -> list[dict]:
    """The messages `create_multiturn_prompt` renders for turn `turn_index` with ``use_chat_template=True``.

    Turn 0: ``[{"role": "user", "content": <first-turn template filled>}]``. Turn i >= 1:
    ``[{"role": "system", "content": ""}, {"role": "assistant", "content": <answer i-1>}, {"role": "user",
    "content": <plain query i>}]`` (only the user message with `disable_golden_context`). history: the
    answers standing for the earlier turns (default: the gold answers). The original renders each with
    ``add_generation_prompt=True`` and, for turns >= 1, removes the rendering of ``[{"role": "system",
    "content": ""}]`` (with a generation prompt unless the golden context is disabled) from it; scbench_summary
    then appends ``"This paper"``; `original_prompts` does all of that. original_quirks: mf follow-ups use the
    last turn's ``"What is ..?"`` prefix, as the original does.
    """
    _check_task(task)
    turns_in = _turns_of(task, row)
    if not 0 <= turn_index < len(turns_in):
        raise ValueError(f"turn_index={turn_index} is not a turn index (0..{len(turns_in) - 1}).")
    turn = turns_in[turn_index]
    t = TEMPLATES[task]
    if turn_index == 0:
        return [{"role": "user", "content": t.first.format(**_fields(task, row, turn))}]
    prefix = mf_question(turns_in[-1]["input"]) if task == "scbench_mf" and original_quirks else None
    user = {"role": "user", "content": t.plain.format(**_fields(task, row, turn, prefix=prefix))}
    if disable_golden_context:
        return [user]
    previous = (
        history[turn_index - 1]
        if history is not None and turn_index - 1 < len(history)
        else turns_in[turn_index - 1]["answer"]
    )
    return [{"role": "system", "content": ""}, {"role": "assistant", "content": answer_text(previous)}, user]


def multi_request_chat_messages(task: str, row: Mapping) -> tuple[list[dict], list[list[dict]]]:
    """The messages `create_scdq_prompt` renders with ``use_chat_template=True``: the context as
    ``[{"role": "user", "content": context_prompt + SCDQ_DELIMITER}]`` (kept: the rendering before the
    delimiter) and each query as ``[{"role": "system", "content": ""}, {"role": "user", "content":
    SCDQ_DELIMITER + query}]`` (kept: the rendering after it), both with ``add_generation_prompt=True``."""
    prefix, turns = multi_request_prompts(task, row)
    context = [{"role": "user", "content": prefix + SCDQ_DELIMITER}]
    queries = [
        [{"role": "system", "content": ""}, {"role": "user", "content": SCDQ_DELIMITER + turn.text}] for turn in turns
    ]
    return context, queries


def _render(tokenizer: ChatTokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    if not isinstance(text, str):
        raise TypeError("apply_chat_template(..., tokenize=False) must return a string.")
    return text


def original_prompts(
    task: str,
    row: Mapping,
    *,
    mode: Mode = "multi-turn",
    tokenizer: ChatTokenizer | None = None,
    disable_golden_context: bool = False,
    history: Sequence[Any] | None = None,
    original_quirks: bool = True,
) -> list[str]:
    """The original's ``prompts`` list for one row, string for string.

    multi-turn: ``[first prompt, follow-up 1, ...]``, each follow-up holding the previous answer in front
    (without a chat template: ``"{pre_ans}\\n\\n..."``; with one: the rendered system + assistant + user
    messages minus the rendered empty system message and generation prompt, i.e. ``answer<end of turn>
    <user header>query<assistant header>`` for the usual templates). multi-request: ``[context prompt,
    query 1, ...]`` (with a chat template: cut at `SCDQ_DELIMITER`). tokenizer: anything with
    ``apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`` (this repo's or a
    transformers tokenizer); None = ``use_chat_template=False``. The original tokenises prompts[0] with special
    tokens (a rendered chat prompt that already starts with BOS text thus gets a second BOS) after cutting it
    in the middle (`truncate_middle`), and the others with ``add_special_tokens=False``.
    """
    _check_mode(mode)
    _check_task(task)
    if mode == "multi-request":
        if tokenizer is None:
            prefix, turns = multi_request_prompts(task, row)
            return [prefix] + [turn.text for turn in turns]
        context, queries = multi_request_chat_messages(task, row)
        return [_render(tokenizer, context, True).split(SCDQ_DELIMITER)[0]] + [
            _render(tokenizer, q, True).split(SCDQ_DELIMITER)[1] for q in queries
        ]
    n = len(_turns_of(task, row))
    if tokenizer is None:
        prefix, turns = multi_turn_prompts(
            task, row, golden_history=history, disable_golden_context=disable_golden_context
        )
        out = [prefix + turns[0].text]
        for i in range(1, n):
            out.append(turns[i - 1].history + turns[i].text)
        return out
    system_only = _render(tokenizer, [{"role": "system", "content": ""}], not disable_golden_context)
    suffix = CHAT_SUMMARY_SUFFIX if task == "scbench_summary" else ""
    out = [_render(tokenizer, chat_messages(task, row, 0), True)]
    for i in range(1, n):
        messages = chat_messages(
            task, row, i, history, disable_golden_context=disable_golden_context, original_quirks=original_quirks
        )
        out.append(_render(tokenizer, messages, True).replace(system_only, "") + suffix)
    return out


# ------------------------------------------------------------------------------------------ input budget


def max_input_length(
    task: str,
    max_seq_length: int = 100_000,
    n_turns: int = 5,
    mode: Mode = "multi-turn",
    sub_tasks: Sequence[str] | None = None,
) -> int:
    """Tokens the original leaves for prompts[0] (`run_scbench.py`): max_seq_length (-1 means 160000) minus
    max_new_tokens * n_turns (a budget >= max_seq_length counts as 500); for the multi-task sets minus
    sum(sub-task budgets) * n_turns // 2; 1000 fewer in multi-request mode. n_turns: the turns of the
    task's first example after ``--max_turns``.

    sub_tasks: the sub-task of each turn, where known. The multi-task rule assumes turns alternate between
    the set's sub-tasks; for turns that do not (the offline needle stand-in has passkey turns alone) the sum
    of their own budgets is taken instead (else 2048 tokens would leave 11 for a passkey context)."""
    _check_task(task)
    _check_mode(mode)
    if max_seq_length == -1:
        max_seq_length = 160_000
    if task in SUB_TASK_MAX_NEW_TOKENS:
        budgets = SUB_TASK_MAX_NEW_TOKENS[task]
        if sub_tasks is not None and not set(budgets) <= set(sub_tasks):
            unknown = sorted(set(sub_tasks) - set(budgets))
            if unknown:
                raise ValueError(f"{task} has sub-tasks {sorted(budgets)}, not {unknown}.")
            limit = max_seq_length - sum(budgets[s] for s in sub_tasks)
        else:
            limit = max_seq_length - sum(budgets.values()) * n_turns // 2
    else:
        budget = MAX_NEW_TOKENS[task]
        if budget >= max_seq_length:
            budget = 500
        limit = max_seq_length - budget * n_turns
    return limit - 1000 if mode == "multi-request" else limit


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """`truncate_input(..., manner="middle")`: the first and last max_length // 2 ids when longer than
    max_length (so an odd max_length keeps one fewer); unchanged when it fits or max_length < 0. (With
    max_length 1 the original keeps everything, a slicing accident; this keeps nothing.)"""
    ids = list(ids)
    if max_length < 0 or len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + (ids[-half:] if half else [])
