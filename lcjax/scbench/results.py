"""Results of a long run, one JSON line per finished example: appended (and flushed) the moment an example
ends, so a killed run loses at most the example in flight, and a rerun skips every key already written.

A line that does not parse (a run killed mid-write leaves a truncated last line) is reported with its file
and line number, never silently dropped: `read_results` raises unless asked to skip it, and `ResultLog`
names it, sets it aside in `<file>.corrupt` and carries on, so that example is run again. A valid JSON line
that is not a result (it lacks a key field, e.g. a line from another tool) is set aside the same way.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator


class CorruptResultError(ValueError):
    """A results file holds a line that is not a JSON object."""


def _parse(path: Path) -> Iterator[tuple[int, str, dict | None]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            yield number, line, row if isinstance(row, dict) else None


def read_results(path: str | os.PathLike, skip_corrupt: bool = False) -> list[dict]:
    """Every row of a JSONL results file (none when it does not exist). A corrupt line raises
    `CorruptResultError` naming the file and line; `skip_corrupt=True` warns with the same text instead."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line, row in _parse(path):
        if row is None:
            message = f"{path}:{number}: not a JSON object ({line.strip()[:80]!r})"
            if not skip_corrupt:
                raise CorruptResultError(message)
            warnings.warn(message + "; skipped", stacklevel=2)
            continue
        rows.append(row)
    return rows


class ResultLog:
    """An append-only JSONL file of results keyed by `key_fields` (e.g. task, method, mode, example id).

    On opening, corrupt lines and rows without every key field are reported (a warning naming file and line)
    and moved to `<file>.corrupt`, the file is rewritten without them, and their examples count as not done.
    """

    def __init__(self, path: str | os.PathLike, key_fields: Iterable[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if self.path.exists():
            self._load()
        self.done = {self.key(row) for row in self.rows}

    def _load(self) -> None:
        good, bad = [], []
        for number, line, row in _parse(self.path):
            missing = None if row is None else [f for f in self.key_fields if f not in row]
            if row is None or missing:
                what = "not a JSON object" if row is None else f"a row without {', '.join(missing)}"
                bad.append((number, line, what))
            else:
                good.append((number, line, row))
        if bad:
            for number, line, what in bad:
                warnings.warn(
                    f"{self.path}:{number}: {what} ({line.strip()[:80]!r}); moved to "
                    f"{self.path.name}.corrupt and its example will run again",
                    stacklevel=3,
                )
            with open(f"{self.path}.corrupt", "a", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for _, line, _ in bad)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for _, _, row in good), encoding="utf-8")
            os.replace(tmp, self.path)
        self.rows = [row for _, _, row in good]

    def key(self, row: dict) -> tuple:
        missing = [f for f in self.key_fields if f not in row]
        if missing:
            raise KeyError(f"result row lacks key field(s) {missing}: {sorted(row)}")
        return tuple(json.dumps(row[f], sort_keys=True) for f in self.key_fields)

    def __contains__(self, key_row: dict) -> bool:
        return self.key(key_row) in self.done

    def append(self, row: dict) -> None:
        """Writes `row` as one line and flushes it to disk (fsync) before returning. A key already present
        raises: resuming must skip done examples, not duplicate them."""
        key = self.key(row)
        if key in self.done:
            raise ValueError(f"{self.path}: a result for {dict(zip(self.key_fields, key))} is already recorded.")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done.add(key)
