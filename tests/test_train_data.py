"""Training data: the built-in essays corpus, packing with separators, a seeded held-out split, and batches that a
step index alone reproduces."""

import json

import numpy as np
import pytest

from lcjax.train.data import Batches, corpus_files, pack, read_documents, split_documents


def test_pack_joins_documents_with_the_separator_and_drops_the_remainder():
    rows = pack([[1, 2, 3], [4], [5, 6]], seq_len=4, separator=0)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 0, 5, 6]])  # the last separator is the remainder
    assert rows.dtype == np.int32
    with pytest.raises(ValueError, match="holds 3 tokens, fewer than one row of seq_len=8"):
        pack([[1, 2]], seq_len=8, separator=0)


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    rows = np.arange(40, dtype=np.int32).reshape(10, 4)
    batches = Batches(rows, batch=2, micro_batches=2, seed=3)
    assert batches.steps_per_epoch == 2 and batches.at(0).shape == (2, 2, 4)
    epoch = np.concatenate([batches.at(s).reshape(-1, 4) for s in range(2)])
    assert len({tuple(r) for r in epoch.tolist()}) == 8  # 8 distinct rows of the 10 in one epoch
    np.testing.assert_array_equal(Batches(rows, 2, 2, seed=3).at(5), batches.at(5))  # resumed: the same block
    assert not np.array_equal(batches.at(2), batches.at(0))  # the next epoch reshuffles
    with pytest.raises(ValueError, match="10 packed rows are fewer than one step's 12"):
        Batches(rows, batch=4, micro_batches=3)


def test_the_builtin_corpus_is_the_49_essays_with_a_held_out_split():
    try:
        files = corpus_files("paul-graham-essays")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    docs = read_documents(files)
    assert len(docs) == 49 and 600_000 < sum(map(len, docs)) < 700_000
    train, held = split_documents(docs, held_out=0.1, seed=0)
    assert len(held) == 5 and len(train) == 44 and not set(held) & set(train)
    assert split_documents(docs, 0.1, seed=0) == (train, held)


def test_the_code_corpus_is_the_standard_library_one_module_a_document():
    files = corpus_files("python-stdlib")
    assert {"os.py", "functools.py", "dataclasses.py"} <= {f.name for f in files}
    docs = read_documents(files[:5])
    assert docs == [f.read_text(encoding="utf-8") for f in files[:5] if f.read_text(encoding="utf-8").strip()]


def test_jsonl_rows_are_documents_and_bad_sources_are_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one doc", "another", " "])))
    assert read_documents(corpus_files(tmp_path)) == ["one doc", "another"]  # the blank document is skipped
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="other.jsonl: no 'text' column"):
        read_documents(corpus_files(tmp_path / "other.jsonl"))
    with pytest.raises(FileNotFoundError, match="No training data at"):
        corpus_files(tmp_path / "missing")
