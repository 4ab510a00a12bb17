"""The results log: appends survive a kill, a rerun skips what is done without duplicates or losses, and a
corrupt line is reported (file and line), set aside, and its example run again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcjax.scbench.results import CorruptResultError, ResultLog, read_results

KEYS = ("task", "method", "id")


def row(i, method="dense"):
    return {"task": "scbench_kv", "method": method, "id": f"ex{i}", "score": i / 10}


KILLED_RUN = """
import os, sys
from lcjax.scbench.results import ResultLog
log = ResultLog(sys.argv[1], ("task", "method", "id"))
for i in range(3):
    log.append({"task": "scbench_kv", "method": "dense", "id": f"ex{i}", "score": i / 10})
os._exit(1)              # killed: no cleanup, no flush beyond what append did
"""


def test_kill_then_resume_without_duplicates_or_losses(tmp_path):
    path = tmp_path / "results.jsonl"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(path)], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    )
    assert done.returncode == 1
    log = ResultLog(path, KEYS)
    assert [r["id"] for r in log.rows] == ["ex0", "ex1", "ex2"]
    todo = [row(i) for i in range(6) if row(i) not in log]
    assert [r["id"] for r in todo] == ["ex3", "ex4", "ex5"]
    for r in todo:
        log.append(r)
    assert [r["id"] for r in read_results(path)] == [f"ex{i}" for i in range(6)]
    assert row(0, method="snapkv") not in log  # another method's example is not done
    with pytest.raises(ValueError, match="already recorded"):
        log.append(row(2))


def test_corrupt_line_is_reported_set_aside_and_rerun(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + '{"task": "scbench_kv", "meth' + "\n" + json.dumps(row(2)) + "\n")
    with pytest.raises(CorruptResultError, match=r"results.jsonl:2"):
        read_results(path)
    with pytest.warns(UserWarning, match=r"results.jsonl:2: not a JSON object"):
        assert [r["id"] for r in read_results(path, skip_corrupt=True)] == ["ex0", "ex2"]
    with pytest.warns(UserWarning, match=r"results.jsonl:2: .*will run again"):
        log = ResultLog(path, KEYS)
    assert [r["id"] for r in log.rows] == ["ex0", "ex2"]
    assert (tmp_path / "results.jsonl.corrupt").read_text().startswith('{"task": "scbench_kv", "meth')
    assert [r["id"] for r in read_results(path)] == ["ex0", "ex2"]  # rewritten without the bad line
    log.append(row(1))
    assert sorted(r["id"] for r in read_results(path)) == ["ex0", "ex1", "ex2"]


def test_missing_key_field_is_named(tmp_path):
    log = ResultLog(tmp_path / "r.jsonl", KEYS)
    with pytest.raises(KeyError, match="method"):
        log.append({"task": "scbench_kv", "id": "x"})


def test_a_foreign_row_is_set_aside_like_a_corrupt_one(tmp_path):
    """A valid JSON object that is not a result (no key fields) is moved to .corrupt, named with its line, and
    the run starts instead of failing on it."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + json.dumps({"note": "from another tool"}) + "\n")
    with pytest.warns(UserWarning, match=r"results.jsonl:2: a row without task, method, id .*will run again"):
        log = ResultLog(path, KEYS)
    assert [r["id"] for r in log.rows] == ["ex0"] and row(0) in log
    assert json.loads((tmp_path / "results.jsonl.corrupt").read_text()) == {"note": "from another tool"}
    assert [r["id"] for r in read_results(path)] == ["ex0"]
