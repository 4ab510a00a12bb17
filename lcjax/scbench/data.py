"""Where a task's rows come from: SCBench's own files when present, else the seeded stand-ins.

Order: `<data_dir>/<task>.jsonl` (the files of the hub dataset `microsoft/SCBench`, `data/<task>.jsonl`, read
through `datasets` so its cache and formats apply); the hub itself when `from_hub=True` and it is reachable;
then, for the tasks whose context is synthetic, `lcjax.scbench.generators` at the requested length in the
model's own tokens. A task with neither gets an error that says where to put its file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import datasets

from lcjax.scbench import generators

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
HUB_DATASET = "microsoft/SCBench"
STANDINS = {"scbench_repoqa": "repoqa_stdlib_standin", "scbench_repoqa_and_kv": "repoqa_and_kv_stdlib_standin"}
"""Offline stand-ins (real stdlib code; ids ``stdlib-standin-...``) a run may use when the task's file is absent."""


class MissingDataError(FileNotFoundError):
    """A task has no data file and no generator."""


def _check_rows(rows: list[dict], source: str) -> list[dict]:
    for i, row in enumerate(rows):
        missing = [k for k in ("id", "context", "multi_turns") if k not in row]
        if missing or not isinstance(row.get("multi_turns"), list) or not row["multi_turns"]:
            raise ValueError(
                f"{source}: row {i} is not in SCBench's format (id, context, multi_turns: "
                f"[{{input, answer}}]); missing or empty: {missing or ['multi_turns']}."
            )
    return rows


def load_task(
    task: str,
    data_dir: str | os.PathLike | None = None,
    *,
    count_tokens: Callable[[str], int] | None = None,
    target_tokens: int = 8192,
    num_examples: int = 2,
    seed: int = 0,
    max_turns: int = 5,
    from_hub: bool = False,
    standins: bool = False,
) -> tuple[list[dict], str]:
    """Rows of `task` in SCBench's format and a word on where they came from ("file ...", "hub", "generated").

    count_tokens and target_tokens size generated contexts (the model's tokenizer); num_examples (-1: all)
    and max_turns cut any source. standins: without the file, repoqa and repoqa_and_kv come from their stdlib
    stand-ins (`STANDINS`). Raises `MissingDataError` naming the file to provide.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown SCBench task {task!r}; the tasks are: {', '.join(TASKS)}.")
    rows, source = None, None
    path = None if data_dir is None else Path(data_dir) / f"{task}.jsonl"
    if path is not None and path.exists():
        rows = list(datasets.load_dataset("json", data_files=str(path), split="train"))
        source = f"file {path}"
    elif from_hub:
        rows = list(datasets.load_dataset(HUB_DATASET, task, split="test"))
        source = f"hub {HUB_DATASET}"
    else:
        name = task if task in generators.GENERATORS else STANDINS.get(task) if standins else None
        if name is not None:
            if count_tokens is None:
                raise ValueError(f"{task}: generating its data needs count_tokens (the model's tokenizer).")
            n = max(num_examples, 1)
            rows = generators.GENERATORS[name](n, target_tokens, count_tokens, seed, max_turns)
            source = "generated" if name == task else f"generated stand-in {name}"
    if rows is None:
        where = f"{path}" if path is not None else f"<data_dir>/{task}.jsonl (pass --data_dir)"
        raise MissingDataError(
            f"{task} has no generator here (its context is real text); put SCBench's file at {where}: the hub "
            f"dataset {HUB_DATASET} holds it as data/{task}.jsonl (datasets.load_dataset({HUB_DATASET!r}, "
            f"{task!r}, split='test').to_json(...) on a machine that reaches the hub), or pass --from_hub "
            f"where the hub is reachable."
            + (
                f" An offline stand-in exists: {STANDINS[task]} (standins=True, the CLI's --standins)."
                if task in STANDINS
                else ""
            )
        )
    rows = _check_rows(rows, source)
    if num_examples >= 0:
        rows = rows[:num_examples]
    return [dict(row, multi_turns=row["multi_turns"][:max_turns]) for row in rows], source
