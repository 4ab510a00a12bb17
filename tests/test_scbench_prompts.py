"""lcjax.scbench.prompts: SCBench's prompts per task and mode (microsoft/MInference scbench/eval_utils.py).

The expected strings are written here by hand from the original's templates; the reference assembly below
(`ref_multi_turn`, `ref_multi_request`) fills whole templates the way the original does, independently of
the module's prefix/turn split."""

from __future__ import annotations

import re

import pytest

from lcjax.scbench import generators as g
from lcjax.scbench import prompts as P

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

KV_HEAD = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
REPOQA_HEAD = (
    "Based on the function description and code context, please retrieve and repeat the exact described "
    "function from the code context in a code block wrapped by ```:\n\n"
)
CHOICE = "Question: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
GENERIC = ("{context}\n\n{input}", "{pre_ans}\n\n{input}", "{input}")

# (first turn, follow-up with the gold answer, query alone), whole, as eval_utils.py writes them
REF = {
    "scbench_kv": (KV_HEAD + "{context}\n\n{input}", "{pre_ans}\n\n{input}", "{input}"),
    "scbench_prefix_suffix": GENERIC,
    "scbench_vt": GENERIC,
    "scbench_repoqa": (REPOQA_HEAD + "{context}\n\n{input}", "{pre_ans}\n\n{input}", "{input}"),
    "scbench_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
        "Question: {question}\nAnswer:",
        "{pre_ans}\n\nQuestion: {question}\nAnswer:",
        "Question: {question}\nAnswer:",
    ),
    "scbench_qa_chn": (
        "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
        "{pre_ans}\n\n问题：{question}\n答案：",
        "问题：{question}\n答案：",
    ),
    "scbench_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\n" + CHOICE + "The the correct answer is",
        "{pre_ans}\n\n" + CHOICE + "The letter of the correct answer is",
        CHOICE + "The the correct answer is",
    ),
    "scbench_many_shot": GENERIC,
    "scbench_mf": ("{prefix}\n\n{context}\n\n{input}", "{pre_ans}\n\n{prefix}\n\n{input}", "{prefix}\n\n{input}"),
    "scbench_summary": GENERIC,
    "scbench_summary_with_needles": GENERIC,
    "scbench_repoqa_and_kv": GENERIC,
}
SCDQ_CONTEXT = {
    "scbench_kv": KV_HEAD + "{context}",
    "scbench_repoqa": REPOQA_HEAD + "{context}",
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}",
    "scbench_mf": "{prefix}\n\n{context}",
}


def words(text: str) -> int:
    return len(text.split())


def ref_fields(task, row, turn, pre_ans=None):
    f = {"context": str(row["context"]), "input": turn["input"], "question": turn["input"], "pre_ans": pre_ans}
    if task == "scbench_choice_eng":
        f.update(
            OPTION_A=turn["options"][0],
            OPTION_B=turn["options"][1],
            OPTION_C=turn["options"][2],
            OPTION_D=turn["options"][3],
        )
    if task == "scbench_mf":
        f["prefix"] = "What is " + re.findall(r"The .+ is", turn["input"])[0].lower()[:-3] + "?"
    return f


def ref_multi_turn(task, row):
    """The original's prompts list (golden context, no chat template)."""
    first, follow, _ = REF[task]
    turns = row["multi_turns"]
    return [first.format(**ref_fields(task, row, turns[0]))] + [
        follow.format(**ref_fields(task, row, turns[i], pre_ans=turns[i - 1]["answer"])) for i in range(1, len(turns))
    ]


def ref_multi_request(task, row):
    turns = row["multi_turns"]
    ctx_fields = ref_fields(task, row, turns[0])
    if task == "scbench_mf":
        ctx_fields["prefix"] = turns[0]["input"]
    context = SCDQ_CONTEXT.get(task, "{context}").format(**ctx_fields)
    return [context] + [REF[task][2].format(**ref_fields(task, row, t)) for t in turns]


# ----------------------------------------------------------------------------------------------- rows

KV_ROW = {
    "id": 0,
    "context": 'JSON data:\n{"k1": "v1", "k2": "v2"}',
    "multi_turns": [
        {"input": 'Key: "k1"\nThe value associated with the specified key is: ', "answer": "v1"},
        {"input": 'Key: "k2"\nThe value associated with the specified key is: ', "answer": "v2"},
    ],
}
MF_IN = "You should answer with only one number, no other words. The {} of the list is: "
MF_ROW = {
    "id": 0,
    "context": [5, 1, 9],
    "multi_turns": [
        {"input": MF_IN.format("largest number"), "answer": 9},
        {"input": MF_IN.format("smallest number"), "answer": 1},
        {"input": MF_IN.format("median number"), "answer": 5},
    ],
}
CHOICE_ROW = {
    "id": 0,
    "context": "Once upon a time.",
    "multi_turns": [
        {"input": "Who?", "options": ["Ann", "Bob", "Cat", "Dan"], "answer": "Bob"},
        {"input": "Where?", "options": ["Oslo", "Rome", "Lima", "Nara"], "answer": "Oslo"},
    ],
}
NEEDLES_ROW = {
    "id": 0,
    "context": "Doc text.",
    "multi_turns": [
        {"input": "Summarize the paper.", "answer": "A summary.", "task": "scbench_summary"},
        {"input": "What is the pass key for the red door?", "answer": "12345", "task": "scbench_passkey"},
        {"input": "Summarize it again.", "answer": "Again.", "task": "scbench_summary"},
    ],
}
HAND_ROWS = {
    "scbench_kv": KV_ROW,
    "scbench_mf": MF_ROW,
    "scbench_choice_eng": CHOICE_ROW,
    "scbench_summary_with_needles": NEEDLES_ROW,
    "scbench_qa_eng": {
        "id": 0,
        "context": "A long book.",
        "multi_turns": [{"input": "Who wrote it?", "answer": "Ann"}, {"input": "When?", "answer": "1900"}],
    },
    "scbench_qa_chn": {
        "id": 0,
        "context": "一本书。",
        "multi_turns": [{"input": "谁写的？", "answer": "安"}, {"input": "何时？", "answer": "1900年"}],
    },
    "scbench_many_shot": {
        "id": 0,
        "context": "Example 1 ... Example 2 ...",
        "multi_turns": [{"input": "Q: first?", "answer": "(A)"}, {"input": "Q: second?", "answer": "(B)"}],
    },
    "scbench_summary": {
        "id": 0,
        "context": "Paper body.",
        "multi_turns": [{"input": "Summarize.", "answer": "S1."}, {"input": "Summarize the method.", "answer": "S2."}],
    },
    "scbench_repoqa": {
        "id": 0,
        "context": "def f():\n    return 1\n",
        "lang": "python",
        "repo": "r",
        "multi_turns": [
            {"input": "Function Description: returns one.", "answer": "def f():\n    return 1", "name": "f"},
            {"input": "Function Description: again.", "answer": "def f():\n    return 1", "name": "f"},
        ],
    },
    "scbench_repoqa_and_kv": {
        "id": 0,
        "context": 'def f():\n    return 1\n\nJSON data:\n{"a": "b"}',
        "multi_turns": [
            {"input": "Describe f.", "answer": "def f():\n    return 1", "name": "f", "task": "scbench_repoqa"},
            {
                "input": 'Key: "a"\nThe value associated with the specified key is: ',
                "answer": "b",
                "task": "scbench_kv",
            },
        ],
    },
    "scbench_vt": {
        "id": 0,
        "context": "VAR AAA = 1 text VAR BBB = VAR AAA",
        "multi_turns": [
            {"input": "Which variables are 1?", "answer": ["AAA", "BBB"]},
            {"input": "Which again?", "answer": ["AAA", "BBB"]},
        ],
    },
    "scbench_prefix_suffix": {
        "id": 0,
        "context": "strings:\nabcXYZ\nabdXYQ",
        "multi_turns": [
            {"input": 'Starts with "abc"?', "answer": "abcXYZ"},
            {"input": 'Starts with "abd"?', "answer": "abdXYQ"},
        ],
    },
}


def generated_rows():
    rows = [
        (t, r)
        for t in ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_mf")
        for r in g.generate(t, 1, 600, words, seed=3, n_turns=4)
    ]
    rows += [("scbench_repoqa", r) for r in g.make_repoqa_stdlib_standin(1, 1500, words, 1, n_turns=2)]
    rows += [("scbench_repoqa_and_kv", r) for r in g.make_repoqa_and_kv_stdlib_standin(1, 2000, words, 1, n_turns=3)]
    doc = " ".join(f"Sentence number {i} of the paper." for i in range(200))
    summary = {"id": 0, "context": doc, "multi_turns": [{"input": "Summarize.", "answer": "A summary."}] * 2}
    rows += [("scbench_summary_with_needles", g.add_needles(summary, 2, seed=5))]
    return rows


ALL_ROWS = [(t, r) for t, r in HAND_ROWS.items()] + generated_rows()
IDS = [f"{t}-{i}" for i, (t, _) in enumerate(ALL_ROWS)]


# ------------------------------------------------------------------------------------------ properties


def test_every_task_has_templates_and_rows():
    assert set(P.TEMPLATES) == set(TASKS) == set(HAND_ROWS)


@pytest.mark.parametrize("task,row", ALL_ROWS, ids=IDS)
def test_multi_turn_concatenation_reproduces_the_original(task, row):
    prefix, turns = P.multi_turn_prompts(task, row)
    original = ref_multi_turn(task, row)
    assert len(turns) == len(row["multi_turns"]) == len(original)
    # the original's cache at turn i holds prompts[0..i] (generated tokens dropped, gold answer in prompt i+1)
    for i in range(len(turns)):
        assert P.full_text(prefix, turns, upto=i) == "".join(original[: i + 1])
        answers = [t["answer"] for t in row["multi_turns"]]
        assert P.full_text(prefix, turns, answers, upto=i) == "".join(original[: i + 1])
    assert P.original_prompts(task, row) == original
    assert prefix.endswith(str(row["context"])) and str(row["context"]) not in turns[0].text
    for turn, raw in zip(turns, row["multi_turns"]):
        assert turn.answer == raw["answer"] and turn.raw is raw
        assert turn.history == str(raw["answer"])
        assert turn.sub_task == raw.get("task", task)
        assert turn.max_new_tokens == P.max_new_tokens(task, raw)


@pytest.mark.parametrize("task,row", ALL_ROWS, ids=IDS)
def test_multi_request_context_once_and_one_query_each(task, row):
    prefix, turns = P.multi_request_prompts(task, row)
    context = str(row["context"])
    assert [prefix] + [t.text for t in turns] == ref_multi_request(task, row)
    assert prefix.count(context) == 1 and prefix.endswith(context)
    for i, (turn, raw) in enumerate(zip(turns, row["multi_turns"])):
        assert context not in turn.text
        assert turn.text.count(raw["input"]) == 1
        others = {t["input"] for t in row["multi_turns"]} - {raw["input"]}
        assert not any(o in turn.text for o in others)
        assert turn.history == "" and turn.max_new_tokens == P.max_new_tokens(task, raw)
    assert P.original_prompts(task, row, mode="multi-request") == [prefix] + [t.text for t in turns]


# ------------------------------------------------------------------------------------- hand-written strings


def test_kv_strings():
    prefix, turns = P.multi_turn_prompts("scbench_kv", KV_ROW)
    assert prefix == (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        'JSON data:\n{"k1": "v1", "k2": "v2"}'
    )
    assert prefix + turns[0].text == (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        'JSON data:\n{"k1": "v1", "k2": "v2"}\n\nKey: "k1"\nThe value associated with the specified key is: '
    )
    assert turns[1].text == '\n\nKey: "k2"\nThe value associated with the specified key is: '
    assert P.original_prompts("scbench_kv", KV_ROW)[1] == (
        'v1\n\nKey: "k2"\nThe value associated with the specified key is: '
    )
    mr_prefix, mr_turns = P.multi_request_prompts("scbench_kv", KV_ROW)
    assert mr_prefix == prefix
    assert mr_turns[0].text == 'Key: "k1"\nThe value associated with the specified key is: '  # no separator
    assert [t.max_new_tokens for t in turns] == [150, 150]


def test_mf_strings_list_context_and_scdq_prefix():
    prefix, turns = P.multi_turn_prompts("scbench_mf", MF_ROW)
    assert prefix == "What is the largest number of the list?\n\n[5, 1, 9]"
    assert prefix + turns[0].text == (
        "What is the largest number of the list?\n\n[5, 1, 9]\n\nYou should answer with only one number, no other "
        "words. The largest number of the list is: "
    )
    assert P.original_prompts("scbench_mf", MF_ROW)[1] == (
        "9\n\nWhat is the smallest number of the list?\n\nYou should answer with only one number, no other words. "
        "The smallest number of the list is: "
    )
    assert turns[0].history == "9" and [t.max_new_tokens for t in turns] == [5, 5, 5]
    mr_prefix, mr_turns = P.multi_request_prompts("scbench_mf", MF_ROW)
    # the original's scdq context puts the first turn's whole input in front of the list
    assert mr_prefix == (
        "You should answer with only one number, no other words. The largest number of the list is: \n\n[5, 1, 9]"
    )
    assert mr_turns[2].text == (
        "What is the median number of the list?\n\nYou should answer with only one number, "
        "no other words. The median number of the list is: "
    )
    assert P.mf_question(MF_IN.format("third largest number")) == "What is the third largest number of the list?"
    # a generated mf context (a string) renders like the hub's list
    assert P.render_context({"context": [12, 3]}) == "[12, 3]" == P.render_context({"context": "[12, 3]"})


def test_choice_eng_strings():
    prefix, turns = P.multi_turn_prompts("scbench_choice_eng", CHOICE_ROW)
    assert prefix + turns[0].text == (
        "Read the book and answer the question.\n\nOnce upon a time.\n\nQuestion: Who?\nA. Ann\nB. Bob\nC. Cat\n"
        "D. Dan\n\nThe the correct answer is"
    )
    assert P.original_prompts("scbench_choice_eng", CHOICE_ROW)[1] == (
        "Bob\n\nQuestion: Where?\nA. Oslo\nB. Rome\nC. Lima\nD. Nara\n\nThe letter of the correct answer is"
    )
    _, mr_turns = P.multi_request_prompts("scbench_choice_eng", CHOICE_ROW)
    assert mr_turns[1].text == "Question: Where?\nA. Oslo\nB. Rome\nC. Lima\nD. Nara\n\nThe the correct answer is"
    assert P.render_options(["w", "x", "y", "z"]) == "A. w\nB. x\nC. y\nD. z"
    with pytest.raises(ValueError, match="four options"):
        P.multi_turn_prompts(
            "scbench_choice_eng",
            {"context": "c", "multi_turns": [{"input": "q", "options": ["a", "b", "c"], "answer": "a"}]},
        )


def test_summary_with_needles_routes_by_sub_task():
    prefix, turns = P.multi_turn_prompts("scbench_summary_with_needles", NEEDLES_ROW)
    assert prefix + turns[0].text == "Doc text.\n\nSummarize the paper."
    assert P.original_prompts("scbench_summary_with_needles", NEEDLES_ROW)[1:] == [
        "A summary.\n\nWhat is the pass key for the red door?",
        "12345\n\nSummarize it again.",
    ]
    assert [(t.sub_task, t.max_new_tokens) for t in turns] == [
        ("scbench_summary", 800),
        ("scbench_passkey", 15),
        ("scbench_summary", 800),
    ]
    _, mr_turns = P.multi_request_prompts("scbench_summary_with_needles", NEEDLES_ROW)
    assert [t.max_new_tokens for t in mr_turns] == [800, 15, 800]


def test_vt_list_answer_is_written_as_python_writes_it():
    row = HAND_ROWS["scbench_vt"]
    prefix, turns = P.multi_turn_prompts("scbench_vt", row)
    assert turns[0].history == "['AAA', 'BBB']"
    assert P.full_text(prefix, turns) == (
        "VAR AAA = 1 text VAR BBB = VAR AAA\n\nWhich variables are 1?['AAA', 'BBB']\n\nWhich again?"
    )


# ------------------------------------------------------------------------------------------ budgets


def test_max_new_tokens_per_task_and_sub_task():
    expected = {
        "scbench_kv": 150,
        "scbench_prefix_suffix": 150,
        "scbench_vt": 30,
        "scbench_mf": 5,
        "scbench_many_shot": 10,
        "scbench_qa_eng": 40,
        "scbench_qa_chn": 40,
        "scbench_choice_eng": 40,
        "scbench_summary": 200,
        "scbench_repoqa": 1024,
    }
    for task, n in expected.items():
        assert P.max_new_tokens(task, {"input": "x"}) == n == P.MAX_NEW_TOKENS[task]
    assert P.MAX_NEW_TOKENS["scbench_passkey"] == 15
    swn, rkv = "scbench_summary_with_needles", "scbench_repoqa_and_kv"
    assert P.max_new_tokens(swn, {"task": "scbench_summary"}) == 800
    assert P.max_new_tokens(swn, {"task": "scbench_passkey"}) == 15
    assert P.max_new_tokens(rkv, {"task": "scbench_repoqa"}) == 1024
    assert P.max_new_tokens(rkv, {"task": "scbench_kv"}) == 80
    with pytest.raises(ValueError, match="sub-task"):
        P.max_new_tokens(swn, {"input": "untagged"})
    with pytest.raises(ValueError, match="sub-task"):
        P.max_new_tokens(rkv, {"task": "scbench_summary"})


def test_max_input_length_and_truncation():
    assert P.max_input_length("scbench_kv", 100_000, 5) == 100_000 - 150 * 5
    assert P.max_input_length("scbench_kv", 100_000, 5, "multi-request") == 100_000 - 750 - 1000
    assert P.max_input_length("scbench_summary_with_needles", 100_000, 5) == 100_000 - 815 * 5 // 2
    assert P.max_input_length("scbench_repoqa", 1000, 2) == 1000 - 500 * 2  # a budget >= the limit counts as 500
    assert P.max_input_length("scbench_mf", -1, 5) == 160_000 - 25
    # turns of one sub-task alone (the needle stand-in): their own budgets, not the alternating rule
    passkeys = ["scbench_passkey"] * 5
    assert P.max_input_length("scbench_summary_with_needles", 2048, 5, sub_tasks=passkeys) == 2048 - 75
    both = ["scbench_summary", "scbench_passkey"] * 2
    assert P.max_input_length("scbench_summary_with_needles", 9000, 4, sub_tasks=both) == 9000 - 815 * 4 // 2
    with pytest.raises(ValueError, match="scbench_kv"):
        P.max_input_length("scbench_summary_with_needles", 9000, 1, sub_tasks=["scbench_kv"])
    assert P.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert P.truncate_middle(list(range(10)), 5) == [0, 1, 8, 9]
    assert P.truncate_middle([1, 2, 3], 3) == [1, 2, 3]
    assert P.truncate_middle([1, 2, 3], -1) == [1, 2, 3]


# ------------------------------------------------------------------------------------------ errors


def test_unknown_task_names_the_known_ones():
    pattern = r"Unknown SCBench task 'scbench_nope'.*scbench_kv.*scbench_repoqa_and_kv"
    for call in (
        lambda: P.multi_turn_prompts("scbench_nope", KV_ROW),
        lambda: P.multi_request_prompts("scbench_nope", KV_ROW),
        lambda: P.chat_messages("scbench_nope", KV_ROW, 0, None),
        lambda: P.max_new_tokens("scbench_nope", {}),
        lambda: P.original_prompts("scbench_nope", KV_ROW),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_bad_rows_and_arguments():
    with pytest.raises(ValueError, match="multi_turns"):
        P.multi_turn_prompts("scbench_kv", {"context": "c", "multi_turns": []})
    with pytest.raises(ValueError, match="The ... is"):
        P.multi_turn_prompts("scbench_mf", {"context": [1], "multi_turns": [{"input": "largest?", "answer": 1}]})
    with pytest.raises(ValueError, match="upto"):
        P.full_text("p", P.multi_turn_prompts("scbench_kv", KV_ROW)[1], upto=2)
    with pytest.raises(ValueError, match="golden_history"):
        P.multi_turn_prompts("scbench_mf", MF_ROW, golden_history=["9"])
    with pytest.raises(ValueError, match="mode"):
        P.original_prompts("scbench_kv", KV_ROW, mode="scdq")


def test_golden_history_and_disabled_golden_context():
    prefix, turns = P.multi_turn_prompts("scbench_mf", MF_ROW, golden_history=["nine", "one"])
    assert [t.history for t in turns] == ["nine", "one", "5"]
    assert P.full_text(prefix, turns, upto=1).endswith(
        "is: nine\n\nWhat is the smallest number of the list?\n\n" + MF_IN.format("smallest number")
    )
    _, plain = P.multi_turn_prompts("scbench_choice_eng", CHOICE_ROW, disable_golden_context=True)
    assert plain[1].text == "Question: Where?\nA. Oslo\nB. Rome\nC. Lima\nD. Nara\n\nThe the correct answer is"
    assert all(t.history == "" for t in plain)


def test_row_without_context_uses_input():
    row = {"id": 0, "input": "ctx", "multi_turns": [{"input": "q", "answer": "a"}]}
    prefix, turns = P.multi_turn_prompts("scbench_many_shot", row)
    assert prefix + turns[0].text == "ctx\n\nq"


# ------------------------------------------------------------------------------------------ chat template


class FakeChat:
    """A Llama-3-style chat template, rendered in Python."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        assert tokenize is False
        text = "<BOS>" + "".join(f"<H>{m['role']}</H>\n\n{m['content']}<EOT>" for m in messages)
        return text + ("<H>assistant</H>\n\n" if add_generation_prompt else "")


def test_chat_messages_multi_turn():
    assert P.chat_messages("scbench_kv", KV_ROW, 0) == [
        {"role": "user", "content": ref_multi_turn("scbench_kv", KV_ROW)[0]}
    ]
    assert P.chat_messages("scbench_kv", KV_ROW, 1) == [
        {"role": "system", "content": ""},
        {"role": "assistant", "content": "v1"},
        {"role": "user", "content": 'Key: "k2"\nThe value associated with the specified key is: '},
    ]
    assert P.chat_messages("scbench_kv", KV_ROW, 1, ["mine"])[1] == {"role": "assistant", "content": "mine"}
    assert P.chat_messages("scbench_kv", KV_ROW, 1, disable_golden_context=True) == [
        {"role": "user", "content": 'Key: "k2"\nThe value associated with the specified key is: '}
    ]
    # mf: the original's chat follow-ups all carry the last turn's question prefix
    quirky = P.chat_messages("scbench_mf", MF_ROW, 1)
    assert quirky[1]["content"] == "9"
    assert quirky[2]["content"] == "What is the median number of the list?\n\n" + MF_IN.format("smallest number")
    fixed = P.chat_messages("scbench_mf", MF_ROW, 1, original_quirks=False)
    assert fixed[2]["content"] == "What is the smallest number of the list?\n\n" + MF_IN.format("smallest number")
    with pytest.raises(ValueError, match="turn_index"):
        P.chat_messages("scbench_kv", KV_ROW, 2)


def test_chat_rendered_prompts():
    tok = FakeChat()
    out = P.original_prompts("scbench_choice_eng", CHOICE_ROW, tokenizer=tok)
    assert (
        out[0]
        == "<BOS><H>user</H>\n\n" + ref_multi_turn("scbench_choice_eng", CHOICE_ROW)[0] + "<EOT><H>assistant</H>\n\n"
    )
    assert out[1] == (
        "Bob<EOT><H>user</H>\n\nQuestion: Where?\nA. Oslo\nB. Rome\nC. Lima\nD. Nara\n\n"
        "The the correct answer is<EOT><H>assistant</H>\n\n"
    )
    summary = P.original_prompts("scbench_summary", HAND_ROWS["scbench_summary"], tokenizer=tok)
    assert not summary[0].endswith("This paper")
    assert summary[1] == "S1.<EOT><H>user</H>\n\nSummarize the method.<EOT><H>assistant</H>\n\nThis paper"
    needles = P.original_prompts("scbench_summary_with_needles", NEEDLES_ROW, tokenizer=tok)
    assert needles[1] == "A summary.<EOT><H>user</H>\n\nWhat is the pass key for the red door?<EOT><H>assistant</H>\n\n"
    # golden context disabled: the rendered system message without a generation prompt is removed
    plain = P.original_prompts("scbench_kv", KV_ROW, tokenizer=tok, disable_golden_context=True)
    assert (
        plain[1] == '<BOS><H>user</H>\n\nKey: "k2"\nThe value associated with the specified key is: <EOT>'
        "<H>assistant</H>\n\n"
    )


def test_chat_multi_request():
    tok = FakeChat()
    out = P.original_prompts("scbench_qa_eng", HAND_ROWS["scbench_qa_eng"], mode="multi-request", tokenizer=tok)
    assert out == [
        "<BOS><H>user</H>\n\nRead the book and answer the question. Be very concise in your answer.\n\nA long book.",
        "Question: Who wrote it?\nAnswer:<EOT><H>assistant</H>\n\n",
        "Question: When?\nAnswer:<EOT><H>assistant</H>\n\n",
    ]
    context, queries = P.multi_request_chat_messages("scbench_kv", KV_ROW)
    assert context[0]["content"].endswith(P.SCDQ_DELIMITER)
    assert queries[0][0] == {"role": "system", "content": ""}
    assert queries[0][1]["content"].startswith(P.SCDQ_DELIMITER)
