"""The SCBench job checks its flags before any data or model loads, names the flag and the fix, never runs a
context past --max_seq_length, and ends a Ctrl-C with one line on what is saved and how to resume."""

import json
import re

import jax
import pytest

import lcjax
from lcjax.config import ModelConfig
from lcjax.jobs import scbench
from lcjax.scbench.results import read_results


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        scbench.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--task", "scbench_foo"], r"--task: unknown task\(s\) scbench_foo; SCBench's tasks: scbench_kv, "),
        (["--kv_budget", "1000", "--methods", "dense,quest"],
         r"--kv_budget 1000 for quest: Quest: token_budget \(1000\) must be a positive multiple of chunk_size \(16\)"),
        (["--methods", "snapkv", "--hyper_param", '{"snapkv": {"windw_size": 8}}'],
         r"--hyper_param for snapkv: snapkv has no hyperparameter 'windw_size'; "
         r"its hyperparameters: capacity, compression_ratio, window_size"),
        (["--methods", "a_shape", "--hyper_param", '{"a_shape": {"n_locl": 8}}'],
         r"--hyper_param: a_shape has no hyperparameter 'n_locl'; its hyperparameters: n_init, n_local, backend"),
        (["--methods", "dense", "--hyper_param", '{"quest": {"token_budget": 64}}'],
         r"--hyper_param names quest, which this run does not use"),
        (["--methods", "minference", "--hyper_param", '{"minference": {"pattern_config": "p.json", "slash_size": 5}}'],
         r"minference with a pattern_config has no hyperparameter 'slash_size'"),
        (["--methods", "minference", "--hyper_param", '{"minference": {"pattern_config": "/nope.json"}}'],
         r"/nope.json: cannot read an MInference pattern config"),
        (["--num_eval_examples", "0"], r"--num_eval_examples must be >= 1 \(or -1: every example\), got 0"),
        (["--max_turns", "0"], r"--max_turns must be >= 1, got 0"),
        (["--mode", "multi-turns"], r"--mode: unknown mode\(s\) \['multi-turns'\]"),
    ],
)  # fmt: skip
def test_bad_flags_are_named_before_anything_loads(capsys, argv, match):
    err = parse_error(capsys, argv)
    assert re.search(match, err), err


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in model's tokenizer alone (the job reads it before the model)."""
    try:
        return lcjax.load_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the job loads the model: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the job loaded the model before the error")

    monkeypatch.setattr(lcjax, "load_model", refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max_seq_length", "1024", "--task", "scbench_kv"],
        ["--max_seq_length", "10", "--task", "scbench_summary_with_needles"],
        ["--max_seq_length", "10"],
    ],
)
def test_a_task_that_does_not_fit_names_the_two_flags_and_the_least_length(tokenizer, no_model, tmp_path, argv):
    with pytest.raises(SystemExit) as exit_info:
        scbench.main(argv + ["--output_dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert "does not fit --max_seq_length" in message and "with --max_turns 5" in message, message
    assert "raise --max_seq_length or lower --max_turns" in message
    least = int(message.split("the least that fits is ")[1].split(";")[0])
    assert least > int(argv[1])
    assert read_results(tmp_path / "results.jsonl") == []  # nothing ran


def test_the_least_length_named_does_fit(tokenizer, no_model):
    """The length the error names passes the same check (and one token less does not)."""
    a = scbench.parse_args(["--task", "scbench_kv", "--max_seq_length", "1024"])
    a.use_chat_template = True
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    least = scbench.smallest_passing(lambda n: scbench._fits("scbench_kv", a, tokenizer, count, n) is not None, 1025)
    assert scbench._fits("scbench_kv", a, tokenizer, count, least) is not None
    assert scbench._fits("scbench_kv", a, tokenizer, count, least - 1) is None


def test_smallest_passing_finds_the_boundary():
    assert scbench.smallest_passing(lambda n: n >= 1000, 1) == 1000
    assert scbench.smallest_passing(lambda n: n >= 3, 3) == 3
    assert scbench.smallest_passing(lambda n: False, 1, limit=64) is None


def test_ctrl_c_says_what_is_saved_and_how_to_resume(tokenizer, monkeypatch, tmp_path):
    config = ModelConfig(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=8192,
    )  # fmt: skip  (run_example is replaced below: the model only has to build the methods)
    model = lcjax.Transformer.init(config, jax.random.key(0))
    monkeypatch.setattr(lcjax, "load_model", lambda *a, **kw: (model, tokenizer))
    calls = []

    def one_run_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return []

    monkeypatch.setattr(scbench, "run_example", one_run_then_interrupt)
    argv = ["--task", "scbench_kv", "--kv_type", "dense", "--max_turns", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        scbench.main(argv)
    message = str(exit_info.value.code)
    assert message.strip().count("\n") == 0, message
    assert f"interrupted: 1 runs are saved in {tmp_path / 'results.jsonl'}; the same command resumes" in message
    assert len(read_results(tmp_path / "results.jsonl")) == 1


def test_a_press_capacity_in_hyper_param_wins_over_the_budget():
    """--hyper_param's capacity for StreamingLLM sizes its sinks too (a quarter at most), not --kv_budget's."""
    a = scbench.parse_args(["--methods", "streamingllm", "--hyper_param", '{"streamingllm": {"capacity": 64}}'])
    press = scbench.cache_method("streamingllm", budget=a.kv_budget, **a.hyper_param["streamingllm"])
    assert (press.capacity, press.n_sink) == (64, 16)


def test_budgets_are_scbench_defaults_unless_set(capsys):
    """Without --kv_budget each method keeps SCBench's own budget (Quest 1024, presses 4096, retr_attn 2000), and
    a budget covering the whole input is named; --kv_budget sets them all."""
    kv = "quest,snapkv,retr_attn"
    a = scbench.parse_args(["--methods", kv])
    kept = {m: getattr(scbench.cache_method(m, budget=a.kv_budget), scbench.BUDGET_FIELDS[m]) for m in kv.split(",")}
    assert kept == {"quest": 1024, "snapkv": 4096, "retr_attn": 2000}
    scbench.note_whole_budgets(a)  # the default --max_seq_length is 3072
    out = capsys.readouterr().out
    assert "snapkv keeps 4096 tokens, at least --max_seq_length 3072" in out and "quest" not in out
    a = scbench.parse_args(["--methods", kv, "--kv_budget", "512"])
    assert {getattr(scbench.cache_method(m, budget=a.kv_budget), scbench.BUDGET_FIELDS[m]) for m in kv.split(",")} == {
        512
    }


def test_hyper_param_json_must_be_an_object_of_objects(capsys):
    err = parse_error(capsys, ["--hyper_param", json.dumps({"snapkv": 8})])
    assert "--hyper_param takes a JSON object of objects" in err
