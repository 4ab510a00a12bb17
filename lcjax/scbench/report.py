"""The end of a run: a task x method table per mode (markdown and CSV) and a plot of score by turn.

Two scorings (`SCORINGS`): "original" reproduces the numbers of SCBench's `compute_scores.py`: each turn scored
with its quirks (a string answer of many_shot / qa_chn matched per character), a multi-turn task's number the
mean over turn indices of each index's mean, a multi-task set's sub-task scored turn index by turn index with 0
where an index has none of its turns, and in multi-request mode scbench_repoqa_and_kv's kv half always 0 (the
original hands its scorer the prediction records instead of their text). "fixed" is lcjax's scorers with
every scored turn pooled per sub-task.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Literal

from matplotlib.figure import Figure

from lcjax.scbench.scoring import MULTI_TASKS

Scoring = Literal["original", "fixed"]
SCORINGS: tuple[Scoring, ...] = ("original", "fixed")


def turn_scores(rows: list[dict], scoring: Scoring = "fixed") -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """(task or sub-task, method, mode) -> turn -> scores, from result rows (one per example). Rows of an offline
    stand-in (ids with ``standin``) are labelled ``<task> (stand-in)``, never mixed with the real task's.
    scoring "original": each turn's `score_original`, and a multi-task set's sub-task gets a 0 at every turn index
    the set has but the sub-task lacks, where the original counts it so."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}.")
    out: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        name = row["task"] + (" (stand-in)" if "standin" in str(row["id"]) else "")
        for t in row["turns"]:
            task = name if t["sub_task"] == row["task"] else f"{name}/{t['sub_task']}"
            score = t["score"] if scoring == "fixed" else t.get("score_original", t["score"])
            out[task, row["method"], row["mode"]][t["turn"]].append(score)
    if scoring == "original":
        _original_gaps(rows, out)
    return out


def _original_gaps(rows: list[dict], out: dict) -> None:
    """compute_scores.py's multi-task quirks, applied to `turn_scores`' cells: in multi-turn mode a sub-task with
    no turn at some turn index of its set scores 0 there; in multi-request mode repoqa_and_kv's kv half is 0
    whatever was predicted. A sub-task with no turn at all in the run stays out of the table (the stand-ins
    have one half only; the original would print a 0)."""
    sets = defaultdict(set)  # (set label, method, mode) -> turn indices
    for row in rows:
        if row["task"] in MULTI_TASKS:
            name = row["task"] + (" (stand-in)" if "standin" in str(row["id"]) else "")
            sets[name, row["method"], row["mode"]].update(t["turn"] for t in row["turns"])
    for (name, method, mode), turns in sets.items():
        for sub in MULTI_TASKS[name.removesuffix(" (stand-in)")]:
            cell = out.get((f"{name}/{sub}", method, mode))
            if cell is None:
                continue
            if mode == "multi-request" and sub == "scbench_kv":
                for scores in cell.values():
                    scores[:] = [0.0] * len(scores)
            if mode == "multi-turn":
                for turn in turns:
                    if not cell.get(turn):
                        cell[turn] = [0.0]


def method_order(rows: list[dict]) -> list[str]:
    """Methods in the order the run met them, the dense baseline first."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(seen, key=lambda m: m != "dense+dense")


def cell_scores(scores: dict, task: str, method: str, mode: str) -> list[float]:
    """Every turn's score of one (task, method, mode) cell of `turn_scores`, turns pooled."""
    return [v for turn in scores.get((task, method, mode), {}).values() for v in turn]


def cell_mean(scores: dict, task: str, method: str, mode: str, scoring: Scoring = "fixed") -> float | None:
    """One cell's number in [0, 1] (None: no turns): "fixed" pools every turn; "original" averages the turn
    indices' means in multi-turn mode (compute_scores.py scores turn by turn) and pools in multi-request mode."""
    by_turn = scores.get((task, method, mode), {})
    if not by_turn:
        return None
    if scoring == "original" and mode == "multi-turn":
        means = [sum(v) / len(v) for v in by_turn.values() if v]
        return sum(means) / len(means)
    vals = cell_scores(scores, task, method, mode)
    return sum(vals) / len(vals)


def table(rows: list[dict], scoring: Scoring = "original") -> tuple[list[str], list[list[str]]]:
    """Header and rows: one line per (task, mode), one column per method, the score in percent under `scoring`
    (see the module docstring) and the number of scored turns."""
    scores = turn_scores(rows, scoring)
    methods = method_order(rows)
    lines = []
    for task, mode in sorted({(t, mo) for t, _, mo in scores}):
        cells = []
        for m in methods:
            mean, n = cell_mean(scores, task, m, mode, scoring), len(cell_scores(scores, task, m, mode))
            cells.append("-" if mean is None else f"{100 * mean:.1f} ({n})")
        lines.append([task, mode] + cells)
    return ["task", "mode"] + methods, lines


def write_tables(rows: list[dict], out_dir: str | Path, scoring: Scoring = "original") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    header, lines = table(rows, scoring)
    md = out_dir / "scores.md"
    md.write_text(
        "| "
        + " | ".join(header)
        + " |\n|"
        + "---|" * len(header)
        + "\n"
        + "".join("| " + " | ".join(l) + " |\n" for l in lines)
    )
    csv_path = out_dir / "scores.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([header] + lines)
    return md, csv_path


def plot_by_turn(rows: list[dict], path: str | Path, scoring: Scoring = "original") -> Path:
    """Mean score (over tasks and examples) by turn, one line per method, one panel per mode."""
    scores = turn_scores(rows, scoring)
    modes = sorted({mo for _, _, mo in scores})
    fig = Figure(figsize=(5 * len(modes), 3.6))  # no pyplot: files only, no display or global state
    axes = fig.subplots(1, len(modes), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        for method in [m for m in method_order(rows) if any(mo == mode and mm == m for _, mm, mo in scores)]:
            by_turn = defaultdict(list)
            for (task, m, mo), turns in scores.items():
                if m == method and mo == mode:
                    for turn, vals in turns.items():
                        by_turn[turn].extend(vals)
            xs = sorted(by_turn)
            ax.plot(
                [x + 1 for x in xs], [100 * sum(by_turn[x]) / len(by_turn[x]) for x in xs], marker="o", label=method
            )
        turns = sorted({t + 1 for (_, _, mo), by in scores.items() if mo == mode for t in by})
        ax.set_xticks(turns)
        ax.set_ylim(-2, 102)
        ax.set_title(mode)
        ax.set_xlabel("turn")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_by_method(rows: list[dict], path: str | Path, scoring: Scoring = "original") -> Path:
    """Mean score per method, one panel per task (or sub-task), bars grouped by mode: where the methods part."""
    scores = turn_scores(rows, scoring)
    methods = method_order(rows)
    tasks = sorted({t for t, _, _ in scores})
    modes = sorted({mo for _, _, mo in scores})
    cols = min(3, len(tasks))
    n_rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.0 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False, sharey=True)
    width = 0.8 / len(modes)
    for ax, task in zip(axes.flat, tasks):
        for j, mode in enumerate(modes):
            means = []
            for m in methods:
                mean = cell_mean(scores, task, m, mode, scoring)
                means.append(float("nan") if mean is None else 100 * mean)
            ax.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(methods))], means, width, label=mode)
        ax.set_title(task.removeprefix("scbench_"), fontsize=9)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(
            [m.replace("+dense", "").replace("dense+", "") for m in methods], rotation=45, ha="right", fontsize=8
        )
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("score (%)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
