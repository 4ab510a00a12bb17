"""lcjax.scbench.generators: seeded, deterministic SCBench-format rows, every answer re-derived here by a
parser of the test's own (json, regexes, ast) from the context text alone."""

from __future__ import annotations

import ast
import json
import re
import sysconfig
import time
from pathlib import Path

import pytest

from lcjax.scbench import generators as g


def words(text: str) -> int:
    return len(text.split())


def chars4(text: str) -> int:
    return len(text) // 4


COUNTERS = {"words": words, "chars4": chars4}
SYNTHETIC = ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_mf")
STANDINS = ("repoqa_stdlib_standin", "repoqa_and_kv_stdlib_standin")
SUBTASKS = {"scbench_passkey", "scbench_summary", "scbench_kv", "scbench_repoqa"}
DOCUMENT = "\n\n".join(
    " ".join(
        f"Paragraph {chr(65 + p % 26)} sentence {chr(97 + s % 26)} talks about rivers and hills." for s in range(12)
    )
    for p in range(40)
)


def rows_of(task: str, target: int = 4000, counter=chars4, seed: int = 0, n: int = 2, turns: int = 5) -> list[dict]:
    return g.generate(task, n, target, counter, seed, turns)


# ------------------------------------------------------------------------------------- independent parsers


def parse_kv(context: str) -> dict[str, str]:
    assert context.startswith("JSON data:\n")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "duplicate key"
        return dict(pairs)

    return json.loads(context[context.index("{") :], object_pairs_hook=no_duplicates)


def check_kv_turn(obj: dict[str, str], turn: dict) -> None:
    pattern = r'Key: "([0-9a-f-]{36})"\nThe value associated with the specified key is: $'
    key = re.search(pattern, turn["input"]).group(1)
    assert isinstance(turn["answer"], str) and obj[key] == turn["answer"]


def resolve_vt(context: str) -> tuple[dict[str, int], dict[str, str]]:
    """Each variable's value and its source variable, tracing `VAR a = VAR b` in text order."""
    value: dict[str, int] = {}
    source: dict[str, str] = {}
    for name, src, number in re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))", context):
        assert name not in value, f"{name} assigned twice"
        if src:
            assert src in value, f"{name} copies {src} before {src} is assigned"
            value[name], source[name] = value[src], src
        else:
            value[name] = int(number)
    return value, source


def mf_expected(numbers: list[int], target: str) -> int:
    distinct = sorted(set(numbers))
    ordinal = {"": 0, "second ": 1, "third ": 2}
    m = re.fullmatch(r"the (second |third |)(largest|smallest) number of the list", target)
    if m:
        k = ordinal[m.group(1)]
        return distinct[-1 - k] if m.group(2) == "largest" else distinct[k]
    assert target == "the median number of the list" and len(numbers) % 2 == 1
    return sorted(numbers)[len(numbers) // 2]


def docstring_summary(node: ast.AST) -> str:
    doc = ast.get_docstring(node)
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def check_repoqa_turn(code: str, tree: ast.Module, turn: dict) -> None:
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    hits = [f for f in fns if docstring_summary(f) and docstring_summary(f) in turn["input"]]
    assert len(hits) == 1, [f.name for f in hits]
    assert ast.get_source_segment(code, hits[0]) == turn["answer"]
    assert turn["name"] == hits[0].name
    assert not re.search(rf"\b{re.escape(turn['name'])}\b", turn["input"], re.IGNORECASE)
    assert turn["answer"].startswith(("def ", "async def "))


def check_real_stdlib(code: str, answers: list[str]) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = re.findall(r"^# Path: Lib/(\S+)$", code, re.MULTILINE)
    assert files and len(files) == len(set(files))
    sources = [(root / f).read_text(encoding="utf-8") for f in files]
    for answer in answers:
        assert any(answer in s for s in sources)


# ------------------------------------------------------------------------------------------- per task


@pytest.mark.parametrize("task", list(g.GENERATORS))
def test_deterministic_per_seed(task):
    a, b = rows_of(task, seed=7), rows_of(task, seed=7)
    assert a == b
    assert json.loads(json.dumps(a)) == a
    c = rows_of(task, seed=8)
    assert [r["context"] for r in a] != [r["context"] for r in c]
    assert [r["multi_turns"] for r in a] != [r["multi_turns"] for r in c]
    assert a[0]["context"] != a[1]["context"]  # rows of one call differ


@pytest.mark.parametrize("task", list(g.GENERATORS))
def test_row_format(task):
    for row in rows_of(task):
        assert set(row) >= {"id", "context", "multi_turns"}
        assert isinstance(row["id"], str) and isinstance(row["context"], str)
        assert len(row["multi_turns"]) == 5
        for turn in row["multi_turns"]:
            assert isinstance(turn["input"], str) and turn["input"] and "answer" in turn
        if task in STANDINS:
            assert row["id"].startswith("stdlib-standin-") and row["lang"] == "python" and row["repo"]
        if task == "repoqa_and_kv_stdlib_standin":
            tags = [t["task"] for t in row["multi_turns"]]
            assert set(tags) <= SUBTASKS and tags == ["scbench_repoqa", "scbench_kv"] * 2 + ["scbench_repoqa"]
            assert all("name" in t for t in row["multi_turns"] if t["task"] == "scbench_repoqa")


def test_kv_answers():
    for row in rows_of("scbench_kv", seed=3):
        obj = parse_kv(row["context"])
        assert len(obj) > 50
        for turn in row["multi_turns"]:
            check_kv_turn(obj, turn)
        assert len({t["answer"] for t in row["multi_turns"]}) == 5


def test_prefix_suffix_answers():
    for row in rows_of("scbench_prefix_suffix", seed=3):
        strings = re.findall(r"^[A-Za-z0-9]+$", row["context"], re.MULTILINE)
        assert len(strings) > 50
        for turn in row["multi_turns"]:
            prefix, suffix = re.search(
                r'starts with "([A-Za-z0-9]+)" and ends with "([A-Za-z0-9]+)"', turn["input"]
            ).groups()
            assert [s for s in strings if s.startswith(prefix) and s.endswith(suffix)] == [turn["answer"]]
            assert any(s.startswith(prefix) and s != turn["answer"] for s in strings)  # a prefix-only distractor
            assert any(s.endswith(suffix) and s != turn["answer"] for s in strings)  # a suffix-only distractor


@pytest.mark.parametrize("n_turns", [1, 5])
def test_vt_answers(n_turns):
    for row in rows_of("scbench_vt", seed=3, turns=n_turns):
        value, source = resolve_vt(row["context"])
        assert row["context"].startswith("Memorize and track the chain(s) of variable assignment")
        for turn in row["multi_turns"]:
            queried = int(re.search(r"assigned the value (\d+) in the text above", turn["input"]).group(1))
            announced = int(re.search(r"(\d+) variables are assigned", turn["input"]).group(1))
            expected = [v for v in value if value[v] == queried]  # text order = assignment order
            assert sorted(turn["answer"]) == sorted(expected) and len(expected) == announced == 5
            assert all(source[b] == a for a, b in zip(turn["answer"], turn["answer"][1:]))
            assert turn["answer"][0] not in source  # the chain's head holds the number itself


def test_mf_answers():
    for row in rows_of("scbench_mf", seed=3, turns=7):
        numbers = json.loads(row["context"])
        assert all(isinstance(x, int) for x in numbers) and len(numbers) % 2 == 1
        targets = []
        for turn in row["multi_turns"]:
            # SCBench's own prompt builder: re.findall(r"The .+ is", input)[0].lower()[:-3]
            target = re.findall(r"The .+ is", turn["input"])[0].lower()[:-3]
            targets.append(target)
            assert type(turn["answer"]) is int and turn["answer"] == mf_expected(numbers, target)
        assert len(set(targets)) == 7  # every sub-question once


def test_needle_turns():
    context, turns = g.needle_turns(DOCUMENT, 4, seed=3)
    needles = re.findall(
        r"The pass key for the ([a-z]+ [a-z]+) is (\d+)\. Remember it\. (\d+) is the pass key "
        r"for the ([a-z]+ [a-z]+)\.",
        context,
    )
    assert len(needles) == 4 and all(a == d and k1 == k2 for a, k1, k2, d in needles)
    keys = {label: key for label, key, _, _ in needles}
    for turn in turns:
        label = re.fullmatch(r"What is the pass key for the (.+)\?", turn["input"]).group(1)
        assert turn["task"] == "scbench_passkey" and turn["answer"] == keys[label]
        assert re.fullmatch(r"\d{5}", turn["answer"])
    stripped = re.sub(
        r" The pass key for the [a-z ]+ is \d+\. Remember it\. \d+ is the pass key for the [a-z ]+\.", "", context
    )
    assert stripped == DOCUMENT  # only the needles were added
    depths = sorted(context.index(f"for the {label} is") / len(context) for label in keys)
    assert depths[0] < 0.3 and depths[-1] > 0.7  # spread over the document
    assert g.needle_turns(DOCUMENT, 4, seed=3) == (context, turns)


def test_needle_turns_sized_and_add_needles():
    target = words(DOCUMENT) // 2
    context, turns = g.needle_turns(DOCUMENT, 3, seed=1, count_tokens=words, target_tokens=target)
    assert 0.8 * target <= words(context) <= target
    assert all(f" is {t['answer']}. Remember it." in context for t in turns)
    summary_turn = {"input": "Summarize the text.", "answer": "A summary."}
    row = {"id": "s0", "context": DOCUMENT, "multi_turns": [summary_turn] * 3}
    out = g.add_needles(row, 3, seed=1)
    assert [t["task"] for t in out["multi_turns"]] == ["scbench_summary", "scbench_passkey"] * 3
    assert out["id"] == "s0" and "task" not in row["multi_turns"][0]  # the input row is left alone


def test_kv_block_turns_and_add_kv_block():
    code = "def f(x):\n    return x + 1\n"
    context, turns = g.kv_block_turns(code, 3, seed=2, n_pairs=40)
    assert context.startswith(code + "\n\n")
    obj = parse_kv(context[len(code) + 2 :])
    assert len(obj) == 40
    for turn in turns:
        assert turn["task"] == "scbench_kv"
        assert turn["input"].startswith("Extract the value corresponding to the specified key")
        check_kv_turn(obj, turn)
    sized, _ = g.kv_block_turns(code, 3, seed=2, count_tokens=chars4, target_tokens=2000)
    assert 0.8 * 2000 <= chars4(sized) <= 2000
    row = {
        "id": "r0",
        "context": code,
        "lang": "python",
        "repo": "x",
        "multi_turns": [{"input": "Function Description: adds one.", "answer": code.strip(), "name": "f"}] * 2,
    }
    out = g.add_kv_block(row, 2, seed=2, n_pairs=10)
    assert [t["task"] for t in out["multi_turns"]] == ["scbench_repoqa", "scbench_kv"] * 2
    assert out["multi_turns"][0]["name"] == "f" and out["repo"] == "x"


def test_repoqa_stdlib_standin_answers():
    for row in rows_of("repoqa_stdlib_standin", target=6000, seed=3):
        tree = ast.parse(row["context"])
        for turn in row["multi_turns"]:
            check_repoqa_turn(row["context"], tree, turn)
        check_real_stdlib(row["context"], [t["answer"] for t in row["multi_turns"]])


def test_repoqa_and_kv_stdlib_standin_answers():
    for row in rows_of("repoqa_and_kv_stdlib_standin", target=8000, seed=3):
        cut = row["context"].rindex("\n\nJSON data:\n")
        code, block = row["context"][:cut], row["context"][cut + 2 :]
        tree, obj = ast.parse(code), parse_kv(block)
        for turn in row["multi_turns"]:
            if turn["task"] == "scbench_repoqa":
                assert turn["input"].startswith("Based on the function description and code context")
                check_repoqa_turn(code, tree, turn)
            else:
                check_kv_turn(obj, turn)


# --------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("counter", list(COUNTERS))
@pytest.mark.parametrize(
    "task,targets", [(t, (1000, 4000, 16000)) for t in SYNTHETIC] + [(t, (3000, 12000)) for t in STANDINS]
)
def test_context_fills_target(task, targets, counter):
    count = COUNTERS[counter]
    for target in targets:
        for row in rows_of(task, target=target, counter=count, seed=target):
            assert 0.8 * target <= count(row["context"]) <= target, (task, target)


@pytest.mark.parametrize("task", SYNTHETIC)
def test_32k_context_is_fast(task):
    start = time.perf_counter()
    (row,) = rows_of(task, target=32768, counter=chars4, n=1)
    elapsed = time.perf_counter() - start
    assert chars4(row["context"]) <= 32768
    assert elapsed < 1.0, f"{task}: {elapsed:.2f}s for a 32K-token context"


def test_too_small_target_raises():
    with pytest.raises(ValueError, match="target_tokens"):
        g.make_scbench_kv(1, 5, chars4, 0)


def test_generate_names_what_it_cannot_make():
    with pytest.raises(ValueError) as err:
        g.generate("scbench_qa_eng", 1, 1000, chars4, 0)
    message = str(err.value)
    for name in (
        "scbench_kv",
        "scbench_prefix_suffix",
        "scbench_vt",
        "scbench_mf",
        "repoqa_stdlib_standin",
        "scbench_qa_eng",
        "scbench_qa_chn",
        "scbench_choice_eng",
        "scbench_many_shot",
        "scbench_summary",
        "<data_dir>/<task>.jsonl",
    ):
        assert name in message
    assert "scbench_repoqa" not in g.GENERATORS  # the stand-in never poses as the real task


def test_needles_filler_standin_answers_are_in_the_context():
    """The passkey half of summary_with_needles over filler text: each turn's key is found by parsing the
    context, the context fits the target, and the rows say they are stand-ins."""
    import re

    from lcjax.scbench.generators import GENERATORS

    words = lambda text: len(text.split())
    rows = GENERATORS["scbench_summary_with_needles"](2, 800, words, 4, 3)
    assert rows == GENERATORS["scbench_summary_with_needles"](2, 800, words, 4, 3)
    for row in rows:
        assert row["id"].startswith("needles-filler-standin-") and 640 <= words(row["context"]) <= 800
        keys = dict(re.findall(r"The pass key for the ([a-z ]+?) is (\d+)\.", row["context"]))
        assert len(row["multi_turns"]) == 3
        for turn in row["multi_turns"]:
            label = re.fullmatch(r"What is the pass key for the (.+)\?", turn["input"]).group(1)
            assert turn["task"] == "scbench_passkey" and keys[label] == turn["answer"]
