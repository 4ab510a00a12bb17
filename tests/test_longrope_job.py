"""The LongRoPE driver end to end on a tiny checkpoint: two searched stages around a short fine-tune, short factors
within the trained length, the export loaded back with the searched factors, and a rerun that resumes from the
files instead of searching again."""

import json
import shutil

import numpy as np
import pytest

import lcjax
from lcjax.jobs import longrope
from lcjax.train.longrope_search import read_factors


def test_stage_lengths_rise_eightfold_to_the_target():
    assert longrope.stage_lengths(8192, 65536, 1) == [65536]
    assert longrope.stage_lengths(8192, 65536, 2) == [16384, 65536]
    assert longrope.stage_lengths(4096, 2**21, 3) == [32768, 262144, 2**21]
    with pytest.raises(ValueError, match="would not each be longer"):
        longrope.stage_lengths(8192, 16384, 2)


def test_search_finetune_search_short_factors_and_export(tmp_path, fixtures_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(fixtures_dir / "hf" / "llama_tied", model)  # plain RoPE, trained on 256 positions
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures_dir / "hf" / "llama" / name, model / name)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, sentence in enumerate(["The quick brown fox jumps over the lazy dog. ", "Pack my box with five jugs. "]):
        (corpus / f"{i}.txt").write_text(sentence * 400)
    out, export = tmp_path / "run", tmp_path / "export"
    argv = ["--model", str(model), "--target-length", "1024", "--stages", "2", "--finetune-steps", "2", "--corpus",
            str(corpus), "--held-out", "0.5", "--documents", "1", "--population", "8", "--generations", "2",
            "--dtype", "float32", "--output-dir", str(out), "--export", str(export)]  # fmt: skip
    longrope.main(argv)
    printed = capsys.readouterr().out
    assert "stage1: best perplexity" in printed and "at 512 tokens" in printed
    assert "stage2: best perplexity" in printed and "at 1024 tokens" in printed
    assert "short: best perplexity" in printed and "at 256 tokens" in printed
    final, stage2 = read_factors(out / "factors.json"), read_factors(out / "stage2_factors.json")
    assert final["long_factor"] == stage2["long_factor"] and final["max_position_embeddings"] == 1024
    long, short = np.asarray(final["long_factor"]), np.asarray(final["short_factor"])
    assert np.all(np.diff(long) >= 0) and long[0] >= 1 and long[-1] <= 1.25 * 4 + 1e-9
    assert np.all(np.diff(short) >= 0) and short[0] >= 1 and short[-1] <= longrope.SHORT_CAP + 1e-9
    history = json.loads((out / "stage2_search.json").read_text())["history"]
    assert len(history) == 2 and history[1] <= history[0]  # the best never gets worse
    # the export: the fine-tuned weights (not the original ones) under the searched factors
    exported, _ = lcjax.load_model(export, dtype="float32")
    tuned, _ = lcjax.load_model(out / "stage1_finetuned", dtype="float32")
    original, _ = lcjax.load_model(model, dtype="float32")
    rope = exported.config.rope
    assert rope.rope_type == "longrope" and list(rope.long_factor) == final["long_factor"]
    assert list(rope.short_factor) == final["short_factor"] and rope.original_max_position_embeddings == 256
    np.testing.assert_array_equal(exported.params["embed"], tuned.params["embed"])
    assert not np.array_equal(exported.params["embed"], original.params["embed"])
    # a rerun reads every stage from its files
    longrope.main(argv)
    assert "best perplexity" not in capsys.readouterr().out
