"""The fine-tuning job end to end at toy sizes: on a tiny checkpoint, every step logged, a rerun resumed from the
checkpoint, the export loaded back; on the built-in model and corpus, the held-out loss falls."""

import json

import pytest

import lcjax
from lcjax.jobs import finetune
from lcjax.load import resolve_model_path
from lcjax.train.data import corpus_files


@pytest.fixture(scope="module", autouse=True)
def essays():
    try:
        corpus_files("paul-graham-essays")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def losses(printed: str) -> tuple[float, float]:
    before, after = printed.split("held-out loss ")[-1].split(" after")[0].split(" -> ")
    return float(before), float(after)


def test_job_logs_every_step_resumes_and_exports(tmp_path, capsys, fixtures_dir):
    out = tmp_path / "run"
    common = ["--model", str(fixtures_dir / "hf" / "llama"), "--seq-len", "64", "--eval-rows", "2", "--remat",
              "none", "--checkpoint-every", "2", "--output-dir", str(out), "--eval-every", "3"]  # fmt: skip
    finetune.main(common + ["--steps", "2"])
    finetune.main(common + ["--steps", "4", "--export", str(tmp_path / "export")])
    printed = capsys.readouterr().out
    assert "resumed from step 2 (data step 2)" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["tokens"] == 63 and r["loss"] > 0 for r in steps)
    held_out = [(r["step"], r["held_out_loss"]) for r in rows if "held_out_loss" in r]
    assert [s for s, _ in held_out] == [0, 2, 2, 3, 4]  # before, last of run 1, first of run 2, --eval-every 3, last
    exported, tokenizer = lcjax.load_model(tmp_path / "export", dtype="float32")
    original, _ = lcjax.load_model(fixtures_dir / "hf" / "llama", dtype="float32")
    assert exported.config == original.config
    with pytest.raises(SystemExit, match="already scaled \\('llama3'\\); extend a model with plain RoPE"):
        finetune.main(common + ["--steps", "4", "--rope", "yarn:2"])
    assert (out / "loss.png").stat().st_size > 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "data=3,tensor=4"], "asks for 12 devices, which does not divide the 8"),  # the suite fakes 8
        (["--mesh", "data=2,pipeline=4"], "the axes are data, fsdp, tensor, context"),
        (["--mesh", "fsdp=2", "--batch", "3"], "--batch 3 does not split over data x fsdp = 2"),
        (["--mesh", "context=4", "--seq-len", "100"], "--seq-len 100 does not split into 2 x context = 8"),
        (["--rope", "ropey:4"], "give TYPE:FACTOR, TYPE one of linear, ntk, dynamic, yarn, FACTOR > 1"),
        (["--rope", "longrope=/no/such/factors.json"], "/no/such/factors.json is not a LongRoPE factors file"),
    ],
)
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resuming_with_other_settings_or_a_damaged_checkpoint_is_refused(tmp_path, fixtures_dir):
    common = ["--model", str(fixtures_dir / "hf" / "llama"), "--seq-len", "32", "--eval-rows", "1", "--remat",
              "none", "--checkpoint-every", "1", "--output-dir", str(tmp_path / "run"), "--steps", "1",
              "--mesh", "fsdp=2,tensor=2,context=2", "--batch", "2"]  # fmt: skip
    finetune.main(common)
    with pytest.raises(SystemExit, match="seed: 0, now 1"):
        finetune.main(common + ["--steps", "2", "--seed", "1"])
    for path in (tmp_path / "run" / "checkpoints").rglob("*"):  # damage the stored arrays
        if path.is_file() and "state" in path.parts and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)
    with pytest.raises(SystemExit, match="step 1 cannot be restored .*damaged"):
        finetune.main(common + ["--steps", "2"])


def test_a_short_run_on_the_builtin_model_lowers_the_held_out_loss(tmp_path, capsys):
    try:
        resolve_model_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    argv = ["--steps", "3", "--seq-len", "64", "--eval-rows", "4", "--lr", "5e-4", "--warmup", "1", "--remat",
            "none", "--checkpoint-every", "0", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    finetune.main(argv)
    before, after = losses(capsys.readouterr().out)
    assert after < before, (before, after)
