"""The fine-tuning job end to end on the built-in model and corpus at toy sizes: the held-out loss falls, every
step is logged, and the exported checkpoint loads with the trained weights."""

import json

import jax.numpy as jnp
import pytest

import lcjax
from lcjax.jobs import finetune
from lcjax.train import TrainConfig, loss_and_count
from lcjax.train.data import corpus_files


def test_a_short_run_lowers_the_held_out_loss_and_exports(smollm2, tmp_path, capsys):
    try:
        corpus_files("paul-graham-essays")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "run"
    argv = ["--steps", "4", "--seq-len", "64", "--eval-rows", "4", "--lr", "5e-4", "--warmup", "1", "--remat", "none",
            "--output-dir", str(out), "--export", str(tmp_path / "export")]  # fmt: skip
    finetune.main(argv)
    printed = capsys.readouterr().out
    before, after = (float(x) for x in printed.split("held-out loss ")[-1].split(" after")[0].split(" -> "))
    assert after < before, printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["tokens"] == 63 for r in rows)
    exported, _ = lcjax.load_model(tmp_path / "export", dtype="float32", layer_layout="stacked")
    tokens = jnp.arange(1, 65, dtype=jnp.int32)[None]
    total, count = loss_and_count(
        exported.params, exported, tokens, jnp.asarray([64]), TrainConfig(compute_dtype="float32")
    )
    assert float(total / count) > 0
    with pytest.raises(SystemExit):  # bad input is refused before any work
        finetune.parse_args(["--mesh", "data=3,model=4"])  # 12 devices; the suite fakes 8
