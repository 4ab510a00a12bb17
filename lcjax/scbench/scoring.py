"""SCBench per-turn scoring, following the semantics of SCBench's `scbench/compute_scores.py` and
`scbench/repo_qa_utils.py` (microsoft/MInference). Each turn gets a score in [0, 1]; a task's number is the
mean over its turns, and the multi-task sets are reported per sub-task (as the original does).

Per task (the original's function in brackets):

- scbench_kv, scbench_prefix_suffix [get_score_one_kv_retrieval]: 1 if the answer is a case-sensitive
  substring of the prediction.
- scbench_mf [get_score_one_math_find]: the first number in the prediction (regex ``\\d+\\.\\d+|\\d+``, no
  sign) is read as ``int(float(x))`` and compared with the integer answer ("3.9" reads as 3).
- scbench_passkey, the needle sub-task of scbench_summary_with_needles [get_score_one_passkey]: the first
  run of digits in the prediction equals the answer as a string (leading zeros count).
- scbench_vt [string_match_all]: fraction of the reference variables found (case-insensitively) in the
  prediction, rounded to 2 decimals as the original rounds it (2 of 3 -> 0.67).
- scbench_qa_eng, scbench_many_shot [get_score_one_longdialogue_qa_eng]: 1 if any label, upper-cased, is a
  substring of the stripped, upper-cased prediction.
- scbench_choice_eng [get_score_one_longbook_choice_eng]: the labels are the gold option's text and its
  letter (eval_utils.get_ground_truth); the letter is read, in this order, from the first character, the
  whole prediction equal to a label, an "answer is:" / "answer:" / "answer is" / "option is" prefix
  (case-sensitive, after punctuation is blanked), then the first word that is a substring of "ABCD".
- scbench_qa_chn [qa_f1_score_zh]: character-level F1 after lower-casing and removing ASCII and the
  original's list of CJK punctuation and all whitespace.
- scbench_summary [get_score_one_longbook_sum_eng]: ROUGE-Lsum F-measure from `rouge-score`, called as
  `evaluate`'s "rouge" metric calls it: `RougeScorer(use_stemmer=False)`, default tokenizer, sentences split
  on newlines, `score(target=answer, prediction=...)`; a list of answers takes the best (`score_multi`).
- scbench_repoqa [repo_qa_utils.compute_score / needle_evaluator]: the code is taken from the prediction's
  first fenced block (the whole stripped prediction when it has none); its similarity to every candidate
  needle of the repository is NLTK's sentence BLEU on whitespace tokens with Chen-Cherry smoothing method 4;
  the turn passes (1.0) iff the most similar candidate (first one on ties) is the gold function and its
  similarity is >= 0.8 (pass@1 at threshold 0.8).
- scbench_summary_with_needles, scbench_repoqa_and_kv: each turn carries its sub-task in ``turn["task"]``
  (scbench_summary / scbench_passkey, scbench_repoqa / scbench_kv) and is scored by that sub-task's scorer.

Deliberate differences from the original (``original_quirks=True`` undoes the first; how turns add up to a
task's number, the original's way or pooled, is `lcjax.scbench.report`'s):

- Answers given as plain strings are taken as one label. The original passes the raw string of the
  scbench_many_shot and scbench_qa_chn data (and would pass that of vt) to scorers that iterate over their
  labels, so it scores against each single character: any one character of the answer found in the
  prediction gives many_shot a 1, and qa_chn gets the best F1 against one character. Pass
  ``original_quirks=True`` to reproduce that.
- repoqa: the original uses tree-sitter to cut the first function definition out of a fenced block (falling
  back to the whole first block); tree-sitter is not used here, so the whole first block is compared. This
  only differs when that block holds more than the function (imports, a usage example, a class around it).
- repoqa's candidate needles are, in the original, the gold functions of every repoqa turn of the same
  repository in the evaluated predictions file. Pass them as ``needles`` (`repoqa_needles` builds them from
  data rows); without them only the gold function is a candidate, so the turn passes iff its similarity is
  >= 0.8.
- passkey compares ``str(answer)`` (the original would never match an int answer; the data's are strings),
  and mf accepts an answer given as a string of digits (the original raises TypeError).
"""

from __future__ import annotations

import functools
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

REPOQA_THRESHOLD = 0.8

# Multi-task sets: the sub-tasks a turn's ``task`` tag may name.
MULTI_TASKS: dict[str, tuple[str, ...]] = {
    "scbench_summary_with_needles": ("scbench_summary", "scbench_passkey"),
    "scbench_repoqa_and_kv": ("scbench_repoqa", "scbench_kv"),
}


# ----------------------------------------------------------------------------------------------------------
# Normalisation and parsing helpers


def _chars(*spans: tuple[int, int] | int) -> str:
    out = []
    for span in spans:
        lo, hi = (span, span) if isinstance(span, int) else span
        out.extend(chr(c) for c in range(lo, hi + 1))
    return "".join(out)


# The punctuation normalize_zh_answer removes on top of string.punctuation (its list, as code points; note
# that it has "》" but not "《", and no fullwidth full stop).
ZH_PUNCTUATION = frozenset(
    string.punctuation
    + _chars(
        (0xFF01, 0xFF0D),
        0xFF0F,
        (0xFF1A, 0xFF20),
        (0xFF3B, 0xFF40),
        (0xFF5B, 0xFF64),
        (0x3001, 0x3003),
        (0x300B, 0x3011),
        (0x3014, 0x301F),
        0x3030,
        0x303E,
        0x303F,
        0x2013,
        0x2014,
        0x2018,
        0x2019,
        (0x201B, 0x201F),
        0x2026,
        0x2027,
        0xFE4F,
    )
)


def normalize_zh(text: str) -> str:
    """Return `text` lower-cased, without ASCII/CJK punctuation and without any whitespace (qa_chn)."""
    kept = "".join(ch for ch in text.lower() if ch not in ZH_PUNCTUATION)
    return "".join(kept.split())


def f1(prediction_tokens: Sequence, reference_tokens: Sequence) -> float:
    """Return the bag-of-tokens F1 of two token sequences (0.0 when they share nothing)."""
    same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def first_digit_run(prediction: str) -> str:
    """Return the first maximal run of ASCII digits in `prediction` ("" if none), as passkey reads it."""
    match = re.search(r"[0-9]+", prediction)
    return match.group(0) if match else ""


def first_number(prediction: str) -> str | None:
    """Return the first unsigned number (decimal or integer) in `prediction` as text, or None (mf)."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    return match.group(0) if match else None


_CHOICE_BLANKED = ("\n", '"', "'", ".", ",", "?", "!", "{", "}")
_CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")


def choice_labels(answer: Any, turn: Mapping | None = None) -> list[str]:
    """Return the choice_eng labels: ``[option text, letter]`` when the turn's options hold the answer,
    the given list when `answer` is already one, else ``[answer]``."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    options = list(turn.get("options") or []) if turn else []
    if answer in options:
        return [answer, "ABCD"[options.index(answer)]]
    return [str(answer)]


def choice_correct(prediction: str, labels: Sequence[str]) -> bool:
    """Return whether `prediction` picks one of `labels`, parsed in the original's order: first character
    in "ABCD"; the whole prediction equal to a label; text after the first "answer is:", "answer:",
    "answer is" or "option is" (one character skipped) starting with a label; the first word that is a
    substring of "ABCD"."""
    pred = prediction.strip()
    if not pred:
        return False
    if pred[0] in "ABCD":
        return pred[0] in labels
    if pred in labels:
        return True
    for ch in _CHOICE_BLANKED:
        pred = pred.replace(ch, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in _CHOICE_PREFIXES:
        at = pred.find(prefix)
        if at < 0:
            continue
        start = at + len(prefix) + 1
        if len(pred) < start:
            return False
        rest = pred[start:]
        return any(rest.startswith(label) for label in labels)
    for word in pred.split():
        if word in "ABCD":
            return word in labels
    return False


def _labels(answer: Any, original_quirks: bool) -> list:
    """A label list: lists as they are; a string is one label (or, with original_quirks, its characters)."""
    if isinstance(answer, (list, tuple)):
        return list(answer)
    if isinstance(answer, str) and original_quirks:
        return list(answer)
    return [answer]


def _single(answer: Any) -> Any:
    return answer[0] if isinstance(answer, (list, tuple)) else answer


# ----------------------------------------------------------------------------------------------------------
# ROUGE-Lsum (summary)


@functools.cache
def _rouge_scorer():
    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)


def rouge_lsum(prediction: str, reference: str | Sequence[str]) -> float:
    """Return the ROUGE-Lsum F-measure of `prediction` against `reference` (the best over a list), as
    `evaluate.load("rouge").compute(predictions=[prediction], references=[reference])` gives it."""
    scorer = _rouge_scorer()
    if isinstance(reference, (list, tuple)):
        return float(scorer.score_multi(list(reference), prediction)["rougeLsum"].fmeasure)
    return float(scorer.score(reference, prediction)["rougeLsum"].fmeasure)


# ----------------------------------------------------------------------------------------------------------
# RepoQA

# An opening fence at a line start with an optional language word, then the block up to the first line
# that starts with a fence (what repo_qa_utils.sanitize_output finds, with DOTALL and MULTILINE).
_FENCED_BLOCK = re.compile(r"^```\w*\s*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def extract_code(prediction: str) -> str:
    """Return the first fenced code block of `prediction`, or the whole stripped prediction if none."""
    text = prediction.strip()
    blocks = _FENCED_BLOCK.findall(text)
    return blocks[0] if blocks else text


def code_similarity(candidate: str, reference: str) -> float:
    """Return sentence BLEU (NLTK, 4-gram, smoothing method 4) of `candidate` against `reference`, both
    split on whitespace runs after stripping."""
    cand = re.split(r"\s+", candidate.strip())
    ref = re.split(r"\s+", reference.strip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([ref], cand, smoothing_function=SmoothingFunction().method4))


def repoqa_needles(rows: Iterable[Mapping]) -> dict[str, list[tuple[str, str]]]:
    """Return, per repository, the ``(function name, gold code)`` of every repoqa turn in `rows` (data rows
    with ``repo`` and ``multi_turns``; in scbench_repoqa_and_kv only turns tagged scbench_repoqa), in order:
    the candidates the original compares each prediction against. Pass the rows actually evaluated (after
    any example or turn limit), as the original builds them from its predictions file."""
    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        for turn in row["multi_turns"]:
            if turn.get("task", "scbench_repoqa") != "scbench_repoqa":
                continue
            out.setdefault(row["repo"], []).append((turn["name"], turn["answer"]))
    return out


def repoqa_match(
    prediction: str, answer: str, gold_name: str | None = None, needles: Sequence[tuple[str, str]] | None = None
) -> tuple[str | None, float]:
    """Return ``(best candidate name, its similarity)`` for `prediction` among `needles` (name, code); the
    gold ``(gold_name, answer)`` is added when absent. The best is the first with the strictly highest
    similarity above 0; None if every similarity is 0."""
    gold_name = gold_name if gold_name is not None else answer
    candidates = list(needles) if needles else []
    if all(name != gold_name for name, _ in candidates):
        candidates.append((gold_name, answer))
    code = extract_code(prediction)
    best_name, best_sim = None, 0.0
    for name, needle in candidates:
        sim = code_similarity(code, needle)
        if sim > best_sim:
            best_name, best_sim = name, sim
    return best_name, best_sim


# ----------------------------------------------------------------------------------------------------------
# Scorers: (prediction, answer, turn, **options) -> float in [0, 1]


def score_kv(prediction: str, answer: Any, turn: Mapping | None = None, **_: Any) -> float:
    """kv / prefix_suffix: 1.0 iff the answer is a (case-sensitive) substring of the prediction."""
    return float(str(_single(answer)) in prediction)


def score_passkey(prediction: str, answer: Any, turn: Mapping | None = None, **_: Any) -> float:
    """passkey: 1.0 iff the prediction's first run of digits equals the answer as a string."""
    return float(str(_single(answer)) == first_digit_run(prediction))


def score_mf(prediction: str, answer: Any, turn: Mapping | None = None, **_: Any) -> float:
    """mf: 1.0 iff the prediction's first number equals the answer (int(float(x)) for an integer answer,
    float(x) for a float one)."""
    label = _single(answer)
    if isinstance(label, str) and re.fullmatch(r"\s*-?\d+\s*", label):
        label = int(label)
    number = first_number(prediction)
    if isinstance(label, bool) or not isinstance(label, Real):
        raise TypeError(f"scbench_mf expects an int or float answer, got {type(label).__name__}")
    if number is None:
        return 0.0
    if isinstance(label, Integral):
        return float(int(float(number)) == label)
    return float(float(number) == label)


def score_vt(
    prediction: str, answer: Any, turn: Mapping | None = None, *, original_quirks: bool = False, **_: Any
) -> float:
    """vt: fraction of reference variables found case-insensitively in the prediction, rounded to 2 places."""
    refs = _labels(answer, original_quirks)
    if not refs:
        raise ValueError("scbench_vt needs at least one reference variable")
    pred = prediction.lower()
    return round(sum(str(r).lower() in pred for r in refs) / len(refs), 2)


def score_any_label(
    prediction: str, answer: Any, turn: Mapping | None = None, *, original_quirks: bool = False, **_: Any
) -> float:
    """qa_eng / many_shot: 1.0 iff any label, upper-cased, is in the stripped, upper-cased prediction."""
    pred = prediction.strip().upper()
    return float(any(str(label).upper() in pred for label in _labels(answer, original_quirks)))


def score_choice(prediction: str, answer: Any, turn: Mapping | None = None, **_: Any) -> float:
    """choice_eng: 1.0 iff the parsed choice is the gold option (see `choice_correct`)."""
    return float(choice_correct(prediction, choice_labels(answer, turn)))


def score_qa_chn(
    prediction: str, answer: Any, turn: Mapping | None = None, *, original_quirks: bool = False, **_: Any
) -> float:
    """qa_chn: best character-level F1 over the labels after `normalize_zh`."""
    pred = list(normalize_zh(prediction))
    return max((f1(pred, list(normalize_zh(str(label)))) for label in _labels(answer, original_quirks)), default=0.0)


def score_summary(prediction: str, answer: Any, turn: Mapping | None = None, **_: Any) -> float:
    """summary: ROUGE-Lsum F-measure against the reference summary (see `rouge_lsum`)."""
    return rouge_lsum(prediction, answer)


def score_repoqa(
    prediction: str,
    answer: Any,
    turn: Mapping | None = None,
    *,
    needles: Sequence[tuple[str, str]] | None = None,
    **_: Any,
) -> float:
    """repoqa: 1.0 iff the most similar candidate is the gold function (``turn["name"]``) with similarity
    >= 0.8 (see `repoqa_match`)."""
    gold_name = turn.get("name") if turn else None
    best, sim = repoqa_match(prediction, str(answer), gold_name, needles)
    gold = gold_name if gold_name is not None else str(answer)
    return float(best == gold and sim >= REPOQA_THRESHOLD)


def _multi(task: str) -> Callable[..., float]:
    def score(prediction: str, answer: Any, turn: Mapping | None = None, **options: Any) -> float:
        return SCORERS[sub_task(task, turn)](prediction, answer, turn, **options)

    score.__name__ = f"score_{task.removeprefix('scbench_')}"
    score.__doc__ = f"{task}: the turn's sub-task scorer, one of {', '.join(MULTI_TASKS[task])}."
    return score


SCORERS: dict[str, Callable[..., float]] = {
    "scbench_kv": score_kv,
    "scbench_prefix_suffix": score_kv,
    "scbench_vt": score_vt,
    "scbench_repoqa": score_repoqa,
    "scbench_qa_eng": score_any_label,
    "scbench_qa_chn": score_qa_chn,
    "scbench_choice_eng": score_choice,
    "scbench_many_shot": score_any_label,
    "scbench_mf": score_mf,
    "scbench_summary": score_summary,
    "scbench_summary_with_needles": _multi("scbench_summary_with_needles"),
    "scbench_repoqa_and_kv": _multi("scbench_repoqa_and_kv"),
    "scbench_passkey": score_passkey,
}
"""Scorer per task and sub-task name; each is ``(prediction, answer, turn=None, **options) -> float``."""


def _check_task(task: str) -> None:
    if task not in SCORERS:
        raise ValueError(f"Unknown SCBench task {task!r}; known tasks: {', '.join(SCORERS)}.")


def sub_task(task: str, turn: Mapping | None) -> str:
    """Return the scorer name a turn of `task` uses: `task` itself, or for a multi-task set the turn's
    ``task`` tag (ValueError if it is missing or not one of the set's sub-tasks)."""
    _check_task(task)
    if task not in MULTI_TASKS:
        return task
    tag = turn.get("task") if turn else None
    if tag not in MULTI_TASKS[task]:
        raise ValueError(
            f"A {task} turn must carry its sub-task in turn['task'], one of "
            f"{', '.join(MULTI_TASKS[task])}; got {tag!r}."
        )
    return tag


def score_turn(
    task: str,
    prediction: str,
    answer: Any,
    turn: Mapping | None = None,
    *,
    needles: Sequence[tuple[str, str]] | None = None,
    original_quirks: bool = False,
) -> float:
    """Return the score in [0, 1] of one turn's `prediction` against its `answer` (as in the data: str, int
    or list) under `task`'s scorer, or its sub-task's for a multi-task set.

    turn: the ``multi_turns`` entry (``task`` tag for multi-task sets, ``options`` for choice_eng, ``name``
    for repoqa). needles: repoqa's candidate ``(name, code)`` functions of the turn's repository (see
    `repoqa_needles`). original_quirks: score string answers of many_shot / qa_chn / vt per character, as
    the original does. Raises ValueError for an unknown task or an untagged multi-task turn.
    """
    name = sub_task(task, turn)
    return float(SCORERS[name](prediction, answer, turn, needles=needles, original_quirks=original_quirks))
