"""Where SCBench rows come from: the original files through `datasets`, cut to the asked examples and turns;
format errors and absent data named with the file to provide."""

import json

import pytest

from lcjax.scbench.data import MissingDataError, load_task


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reads_the_original_file_and_cuts_examples_and_turns(tmp_path):
    rows = [
        {
            "id": f"r{i}",
            "context": "ctx " * 10,
            "multi_turns": [{"input": f"q{j}", "answer": f"a{j}"} for j in range(6)],
        }
        for i in range(4)
    ]
    write_rows(tmp_path / "scbench_qa_eng.jsonl", rows)
    got, source = load_task("scbench_qa_eng", tmp_path, num_examples=3, max_turns=2)
    assert source == f"file {tmp_path / 'scbench_qa_eng.jsonl'}"
    assert [r["id"] for r in got] == ["r0", "r1", "r2"]
    assert [t["input"] for t in got[1]["multi_turns"]] == ["q0", "q1"]
    assert len(load_task("scbench_qa_eng", tmp_path, num_examples=-1)[0]) == 4


def test_format_and_absence_errors_say_what_to_do(tmp_path):
    write_rows(tmp_path / "scbench_summary.jsonl", [{"id": "x", "context": "c"}])
    with pytest.raises(ValueError, match="row 0 is not in SCBench's format.*multi_turns"):
        load_task("scbench_summary", tmp_path)
    with pytest.raises(MissingDataError, match=r"scbench_qa_chn\.jsonl.*data/scbench_qa_chn\.jsonl"):
        load_task("scbench_qa_chn", tmp_path)
    with pytest.raises(ValueError, match="Unknown SCBench task 'scbench_nope'.*scbench_kv"):
        load_task("scbench_nope", tmp_path)


def test_synthetic_tasks_are_generated_at_the_asked_length_in_the_given_tokens(tmp_path):
    words = lambda text: len(text.split())
    rows, source = load_task(
        "scbench_kv", tmp_path, count_tokens=words, target_tokens=600, num_examples=2, max_turns=3, seed=5
    )
    assert source == "generated" and len(rows) == 2 and all(len(r["multi_turns"]) == 3 for r in rows)
    assert all(480 <= words(r["context"]) <= 600 for r in rows)
    again, _ = load_task(
        "scbench_kv", tmp_path, count_tokens=words, target_tokens=600, num_examples=2, max_turns=3, seed=5
    )
    assert again == rows
    with pytest.raises(ValueError, match="needs count_tokens"):
        load_task("scbench_vt", tmp_path)


def test_repoqa_stand_in_only_when_asked_and_labelled(tmp_path):
    words = lambda text: len(text.split())
    with pytest.raises(MissingDataError, match="scbench_repoqa.jsonl.*stand-in exists: repoqa_stdlib_standin"):
        load_task("scbench_repoqa", tmp_path, count_tokens=words, target_tokens=800)
    rows, source = load_task(
        "scbench_repoqa", tmp_path, count_tokens=words, target_tokens=800, num_examples=1, max_turns=2, standins=True
    )
    assert source == "generated stand-in repoqa_stdlib_standin" and rows[0]["id"].startswith("stdlib-standin-")
    write_rows(
        tmp_path / "scbench_repoqa.jsonl",
        [{"id": "real", "context": "c", "multi_turns": [{"input": "q", "answer": "a"}]}],
    )
    rows, source = load_task("scbench_repoqa", tmp_path, standins=True)  # the file wins
    assert source.startswith("file") and rows[0]["id"] == "real"
    from lcjax.scbench.report import table

    result = lambda id_: {
        "task": "scbench_repoqa",
        "id": id_,
        "method": "dense+dense",
        "mode": "multi-turn",
        "turns": [{"turn": 0, "sub_task": "scbench_repoqa", "score": 1.0}],
    }
    _, lines = table([result("real"), result("stdlib-standin-0-0")])
    assert [l[0] for l in lines] == ["scbench_repoqa", "scbench_repoqa (stand-in)"]
