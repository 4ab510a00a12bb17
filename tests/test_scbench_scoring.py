"""SCBench per-turn scoring: hand-made cases for every scorer (semantics of SCBench's compute_scores.py)."""

import re

import pytest

from lcjax.scbench.report import table
from lcjax.scbench.scoring import (
    SCORERS,
    choice_correct,
    code_similarity,
    extract_code,
    normalize_zh,
    repoqa_needles,
    score_turn,
    sub_task,
)

TASKS = (
    "scbench_kv",
    "scbench_prefix_suffix",
    "scbench_vt",
    "scbench_repoqa",
    "scbench_qa_eng",
    "scbench_qa_chn",
    "scbench_choice_eng",
    "scbench_many_shot",
    "scbench_mf",
    "scbench_summary",
    "scbench_summary_with_needles",
    "scbench_repoqa_and_kv",
)


def test_every_task_and_sub_task_has_a_scorer():
    for task in (*TASKS, "scbench_passkey"):
        assert task in SCORERS


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown SCBench task 'scbench_nope'.*scbench_kv.*scbench_repoqa_and_kv"):
        score_turn("scbench_nope", "x", "x")
    with pytest.raises(ValueError, match="Unknown SCBench task"):
        sub_task("kv_retrieval", {})


# --- kv / prefix_suffix: case-sensitive substring ------------------------------------------------------


@pytest.mark.parametrize("task", ["scbench_kv", "scbench_prefix_suffix"])
def test_substring_hit_miss_and_case(task):
    label = "9f1c-Ab42"
    assert score_turn(task, f'The value is "{label}".', label) == 1.0
    assert score_turn(task, "The value is 9f1c-Ab4.", label) == 0.0
    assert score_turn(task, f"The value is {label.upper()}.", label) == 0.0  # case matters


# --- mf and passkey: first number -------------------------------------------------------------------------


def test_mf_first_number_with_distractors():
    assert score_turn("scbench_mf", "The answer is 42, not 17", 42) == 1.0
    assert score_turn("scbench_mf", "The answer is 42, not 17", 17) == 0.0
    assert score_turn("scbench_mf", "no number here", 42) == 0.0
    assert score_turn("scbench_mf", "3.9 or so", 3) == 1.0  # int(float("3.9")) == 3, as the original reads it
    assert score_turn("scbench_mf", "-5", 5) == 1.0  # no sign: the original's regex is \d+\.\d+|\d+
    assert score_turn("scbench_mf", "it is 7", [7]) == 1.0  # a one-element list is its element


def test_passkey_first_digit_run_as_string():
    turn = {"task": "scbench_passkey"}
    assert score_turn("scbench_summary_with_needles", "The answer is 42, not 17", "42", turn) == 1.0
    assert score_turn("scbench_summary_with_needles", "The answer is 42, not 17", "17", turn) == 0.0
    assert score_turn("scbench_passkey", "pass key: 0042", "42") == 0.0  # compared as text
    assert score_turn("scbench_passkey", "key 4.2", "4") == 1.0  # first run of digits only
    assert score_turn("scbench_passkey", "none", "42") == 0.0


# --- vt: fraction of variables found ------------------------------------------------------------------


def test_vt_partial_credit_rounded_like_the_original():
    refs = ["VAR_ALPHA", "var_beta", "VAR_GAMMA"]
    assert score_turn("scbench_vt", "var_alpha, VAR_BETA", refs) == round(2 / 3, 2) == 0.67
    assert score_turn("scbench_vt", "VAR_ALPHA VAR_BETA VAR_GAMMA", refs) == 1.0
    assert score_turn("scbench_vt", "nothing", refs) == 0.0


# --- qa_eng / many_shot: any upper-cased label in the prediction ----------------------------------------


def test_qa_eng_any_label_case_insensitive():
    assert score_turn("scbench_qa_eng", "  it was in paris, I think ", "Paris") == 1.0
    assert score_turn("scbench_qa_eng", "London", "Paris") == 0.0
    assert score_turn("scbench_qa_eng", "LYON", ["Paris", "Lyon"]) == 1.0


def test_many_shot_whole_label_and_original_quirk():
    assert score_turn("scbench_many_shot", "(a)", "(A)") == 1.0
    assert score_turn("scbench_many_shot", "(B)", "(A)") == 0.0
    # The original iterates over the characters of a string answer: "(" alone matches.
    assert score_turn("scbench_many_shot", "(B)", "(A)", original_quirks=True) == 1.0


# --- choice_eng: letter parsing in the original's order -------------------------------------------------

OPTIONS = ["red", "green", "blue", "yellow"]
TURN = {"input": "Which colour?", "answer": "green", "options": OPTIONS}


@pytest.mark.parametrize(
    "prediction,expected",
    [
        ("B. green", 1.0),  # rule 1: first character
        ("C", 0.0),
        ("Although B looks odd, B", 0.0),  # rule 1 fires on the leading "A" before any later rule
        ("Because C is wrong", 1.0),  # ... and reads the leading "B" of a word
        ("green", 1.0),  # rule 2: the whole prediction is a label
        ("I believe the answer is B.", 1.0),  # rule 3: "answer is" prefix
        ("so the answer is: green!", 1.0),  # "answer is:" takes the option text too
        ("the answer is C", 0.0),
        ("the answer is (B)", 0.0),  # one character skipped after the prefix, then "(B" != "B"
        ("My final answer: B", 1.0),  # "answer:"
        ("the correct option is B", 1.0),  # "option is"
        ("I would go with B here", 1.0),  # rule 4: first word inside "ABCD"
        ("I would go with D here", 0.0),
        ("pick AB then B", 0.0),  # "AB" is a substring of "ABCD", and not a label
        ("b. green", 0.0),  # case-sensitive letters, and no rule finds "green" here
        ("none of them", 0.0),
        ("   ", 0.0),
    ],
)
def test_choice_parsing(prediction, expected):
    assert score_turn("scbench_choice_eng", prediction, "green", TURN) == expected


def test_choice_labels_from_answer_or_list():
    assert choice_correct("B", ["green", "B"])
    assert score_turn("scbench_choice_eng", "B", ["green", "B"]) == 1.0
    assert score_turn("scbench_choice_eng", "B", "green") == 0.0  # no options: only the text is a label


# --- qa_chn: character F1 -------------------------------------------------------------------------------


def test_qa_chn_character_f1_by_hand():
    assert normalize_zh("是 北京。") == "是北京"
    # The original's CJK list has "》" and "／" but not "《" (and no fullwidth full stop "．").
    assert normalize_zh("「北京」《大学》，／\tＡ．") == "北京《大学ａ．"
    # pred chars 是北京 (3), label 北京大学 (4), common 北, 京: P = 2/3, R = 2/4, F1 = 4/7.
    assert score_turn("scbench_qa_chn", "是 北京。", "北京大学") == pytest.approx(4 / 7)
    assert score_turn("scbench_qa_chn", "北京大学！", "北京大学") == pytest.approx(1.0)
    assert score_turn("scbench_qa_chn", "上海", "北京大学") == 0.0
    # The original's per-character reading: best F1 against one character, 2 * (1/3) / (1/3 + 1) = 0.5.
    assert score_turn("scbench_qa_chn", "是 北京。", "北京大学", original_quirks=True) == pytest.approx(0.5)


# --- summary: ROUGE-Lsum -----------------------------------------------------------------------------------


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_summary_rouge_lsum_matches_an_independent_lcs():
    ref = "The old cat sat quietly on the mat today."
    pred = "A cat was sitting on the warm mat"
    r, p = re.findall(r"[a-z0-9]+", ref.lower()), re.findall(r"[a-z0-9]+", pred.lower())
    lcs = _lcs(r, p)
    assert lcs == 4  # cat, on, the, mat
    precision, recall = lcs / len(p), lcs / len(r)
    expected = 2 * precision * recall / (precision + recall)
    assert score_turn("scbench_summary", pred, ref) == pytest.approx(expected, abs=1e-12)


def test_summary_is_unstemmed_and_splits_sentences_on_newlines():
    assert score_turn("scbench_summary", "cat run", "cats running") == 0.0  # a stemmer would give 1.0
    # Per reference sentence, LCS against every prediction sentence: both sentences fully recovered -> 1.0,
    # where one flat LCS over "c d a b" vs "a b c d" would give 0.5.
    assert score_turn("scbench_summary", "c d a b", "a b\nc d") == pytest.approx(1.0)
    assert score_turn("scbench_summary", "x y", "a b\nc d") == 0.0


# --- repoqa: similarity of the retrieved function ----------------------------------------------------------

GOLD = """def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    out = []
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out"""
NEAR = GOLD.replace('raise ValueError("window must be positive")', 'raise ValueError("bad window")')
FAR = GOLD.replace("total", "acc")
REPO_TURN = {"input": "Find the moving average function.", "answer": GOLD, "name": "moving_average"}


def _fenced(code):
    return f"Here is the function:\n```python\n{code}\n```\nIt keeps a running sum."


def test_repoqa_threshold_and_fence():
    assert 0.8 <= code_similarity(NEAR, GOLD) < 1.0
    assert 0.6 < code_similarity(FAR, GOLD) < 0.8
    assert extract_code(_fenced(NEAR)) == NEAR + "\n"  # the block keeps its last newline, as the original
    assert score_turn("scbench_repoqa", _fenced(GOLD), GOLD, REPO_TURN) == 1.0
    assert score_turn("scbench_repoqa", _fenced(NEAR), GOLD, REPO_TURN) == 1.0
    assert score_turn("scbench_repoqa", _fenced(FAR), GOLD, REPO_TURN) == 0.0
    assert score_turn("scbench_repoqa", "I could not find it.", GOLD, REPO_TURN) == 0.0


def test_repoqa_unfenced_prose_counts_against_similarity():
    prose = "Sure. " * 40 + "\n" + GOLD + "\n" + "This is the one you asked for. " * 20
    assert code_similarity(extract_code(prose), GOLD) < 0.8
    assert score_turn("scbench_repoqa", prose, GOLD, REPO_TURN) == 0.0


def test_repoqa_best_candidate_must_be_the_gold_function():
    needles = [("moving_average", GOLD), ("moving_average_v2", NEAR)]
    # NEAR is >= 0.8 similar to the gold, but it is the other needle itself, which wins.
    assert score_turn("scbench_repoqa", _fenced(NEAR), GOLD, REPO_TURN, needles=needles) == 0.0
    assert score_turn("scbench_repoqa", _fenced(GOLD), GOLD, REPO_TURN, needles=needles) == 1.0


def test_repoqa_needles_from_rows():
    rows = [
        {
            "repo": "r1",
            "multi_turns": [
                {"name": "f", "answer": "def f(): pass", "task": "scbench_repoqa"},
                {"answer": "k1", "task": "scbench_kv"},
            ],
        },
        {"repo": "r1", "multi_turns": [{"name": "g", "answer": "def g(): pass"}]},
        {"repo": "r2", "multi_turns": [{"name": "h", "answer": "def h(): pass"}]},
    ]
    assert repoqa_needles(rows) == {
        "r1": [("f", "def f(): pass"), ("g", "def g(): pass")],
        "r2": [("h", "def h(): pass")],
    }


# --- multi-task routing -------------------------------------------------------------------------------------


def test_multi_task_routing_by_turn_tag():
    pred = "The pass key is 12345. The story is about a cat."
    passkey_turn = {"input": "What is the pass key?", "answer": "12345", "task": "scbench_passkey"}
    summary_turn = {"input": "Summarize.", "answer": "A story about a dog.", "task": "scbench_summary"}
    assert sub_task("scbench_summary_with_needles", passkey_turn) == "scbench_passkey"
    assert sub_task("scbench_summary_with_needles", summary_turn) == "scbench_summary"
    assert sub_task("scbench_kv", passkey_turn) == "scbench_kv"  # a single task ignores the tag
    assert score_turn("scbench_summary_with_needles", pred, "12345", passkey_turn) == 1.0
    summary = score_turn("scbench_summary_with_needles", pred, "A story about a dog.", summary_turn)
    assert 0.0 < summary < 1.0
    assert summary == score_turn("scbench_summary", pred, "A story about a dog.")

    kv_turn = {"input": "key?", "answer": "val-77", "task": "scbench_kv"}
    assert sub_task("scbench_repoqa_and_kv", kv_turn) == "scbench_kv"
    assert score_turn("scbench_repoqa_and_kv", "It is val-77.", "val-77", kv_turn) == 1.0
    repo_turn = dict(REPO_TURN, task="scbench_repoqa")
    assert score_turn("scbench_repoqa_and_kv", _fenced(NEAR), GOLD, repo_turn) == 1.0
    assert score_turn("scbench_repoqa_and_kv", _fenced(FAR), GOLD, repo_turn) == 0.0
    assert SCORERS["scbench_repoqa_and_kv"]("It is val-77.", "val-77", kv_turn) == 1.0


def test_multi_task_turn_without_a_valid_tag_is_an_error():
    with pytest.raises(ValueError, match="scbench_summary, scbench_passkey"):
        score_turn("scbench_summary_with_needles", "1", "1", {"input": "q"})
    with pytest.raises(ValueError, match="got 'scbench_kv'"):
        sub_task("scbench_summary_with_needles", {"task": "scbench_kv"})
    with pytest.raises(ValueError):
        score_turn("scbench_repoqa_and_kv", "1", "1")


def _row(task, mode, turns, i=0):
    turns = [{"turn": t, "sub_task": sub, "score": s, "score_original": s} for t, sub, s in turns]
    return {"task": task, "method": "dense+dense", "mode": mode, "id": f"ex{i}", "turns": turns}


def test_original_aggregation_scores_mixed_sets_turn_by_turn():
    """compute_scores.py's aggregation: multi-turn scores turn index by turn index (a sub-task missing at an
    index counts 0 there) and averages the indices; multi-request pools, with repoqa_and_kv's kv half 0."""
    summ, key = "scbench_summary", "scbench_passkey"
    rows = [
        _row("scbench_summary_with_needles", "multi-turn", [(0, summ, 0.5), (1, key, 1.0)], 0),
        _row("scbench_summary_with_needles", "multi-turn", [(0, summ, 0.3), (1, summ, 0.1)], 1),
        _row("scbench_repoqa_and_kv", "multi-request", [(0, "scbench_kv", 1.0), (1, "scbench_repoqa", 1.0)]),
        _row("scbench_kv", "multi-turn", [(0, "scbench_kv", 1.0), (1, "scbench_kv", 0.0), (2, "scbench_kv", 0.0)], 0),
        _row("scbench_kv", "multi-turn", [(0, "scbench_kv", 1.0)], 1),
    ]
    cells = lambda scoring: {(line[0], line[1]): line[2] for line in table(rows, scoring)[1]}
    original, fixed = cells("original"), cells("fixed")
    assert original["scbench_summary_with_needles/scbench_summary", "multi-turn"].startswith("25.0")  # (.4 + .1) / 2
    assert original["scbench_summary_with_needles/scbench_passkey", "multi-turn"].startswith("50.0")  # (0 + 1) / 2
    assert fixed["scbench_summary_with_needles/scbench_summary", "multi-turn"] == "30.0 (3)"
    assert fixed["scbench_summary_with_needles/scbench_passkey", "multi-turn"] == "100.0 (1)"
    assert original["scbench_repoqa_and_kv/scbench_kv", "multi-request"].startswith("0.0")
    assert fixed["scbench_repoqa_and_kv/scbench_kv", "multi-request"] == "100.0 (1)"
    assert original["scbench_kv", "multi-turn"].startswith("33.3")  # turn means 1, 0, 0
    assert fixed["scbench_kv", "multi-turn"] == "50.0 (4)"
    with pytest.raises(ValueError, match="scoring must be"):
        table(rows, "exact")
