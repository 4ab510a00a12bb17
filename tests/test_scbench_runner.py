"""One SCBench example through the built-in model in both modes: cache reuse is what the modes say, the golden
history makes a later turn equal a from-scratch run of the whole text, and a compressing cache stays applied."""

import dataclasses

import pytest

import lcjax
from lcjax.generate import generate
from lcjax.methods import SnapKVPress
from lcjax.scbench import generators, prompts
from lcjax.scbench.runner import run_example, token_pieces


@pytest.fixture(scope="module")
def kv_row(smollm2):
    _, tok = smollm2
    count = lambda text: len(tok.encode(text, add_special_tokens=False))
    return generators.GENERATORS["scbench_kv"](1, 300, count, 3, 2)[0]


def test_multi_turn_reuses_the_cache_and_equals_a_fresh_run(smollm2, kv_row):
    model, tok = smollm2
    res = run_example(model, tok, "scbench_kv", kv_row, "multi-turn", max_new_tokens_cap=6)
    assert [r.turn for r in res] == [0, 1] and res[0].reused_tokens == 0
    assert res[1].reused_tokens == res[0].cache_tokens == res[0].prefilled_tokens  # dense: all kept
    prefix, turns = prompts.multi_turn_prompts("scbench_kv", kv_row)
    enc = lambda t: tok.encode(t, add_special_tokens=False)
    whole = (
        tok.encode(prefix)  # the tokenizer's own rule: SmolLM2's adds no BOS
        + enc(turns[0].text)
        + enc(turns[0].history)
        + enc(turns[1].text)
    )
    assert res[1].seen_tokens == len(whole) and res[1].prefilled_tokens == len(
        enc(turns[0].history) + enc(turns[1].text)
    )
    fresh, _ = generate(model, whole, 6, stop_tokens=tok.eos_token_ids)
    assert res[1].prediction == tok.decode(fresh[0]).strip()
    assert all(0.0 <= r.score <= 1.0 for r in res)


def test_first_prompt_gets_a_bos_by_the_tokenizers_rule(smollm2, kv_row):
    """As SCBench's `tok.encode(prompts[0])`: a BOS in front where the tokenizer adds one, none where it does not."""
    _, tok = smollm2
    for add_bos in (False, True):
        t = dataclasses.replace(tok, add_bos=add_bos)
        _, pieces, _ = token_pieces(t, "scbench_kv", kv_row, "multi-turn")
        assert (pieces[0][0] == tok.bos_token_id) == add_bos and pieces[1][0] != tok.bos_token_id
        _, pieces, _ = token_pieces(t, "scbench_kv", kv_row, "multi-turn", use_chat_template=True)
        rendered = prompts.original_prompts("scbench_kv", kv_row, tokenizer=t)
        assert pieces[0] == t.encode(rendered[0])  # SmolLM2's template starts with its BOS, <|im_start|>


def test_disabled_golden_context_keeps_the_models_answers(smollm2, kv_row):
    """--disable_golden_context: turn 1 continues from turn 0's own answer (all but its last token, which the
    original never feeds back; an answer cut by its budget is followed by EOS) and equals a fresh run of that
    text."""
    model, tok = smollm2
    _, pieces, plain = token_pieces(tok, "scbench_kv", kv_row, "multi-turn", disable_golden_context=True)
    assert plain[0].history == "" and pieces[1] == tok.encode(plain[1].text, add_special_tokens=False)
    answer = generate(model, pieces[0], 3, stop_tokens=tok.eos_token_ids)[0][0]
    assert len(answer) == 3 and answer[-1] not in tok.eos_token_ids  # cut by the budget: EOS comes next
    res = run_example(model, tok, "scbench_kv", kv_row, "multi-turn", max_new_tokens_cap=3, disable_golden_context=True)
    whole = pieces[0] + answer[:-1] + [tok.eos_token_id] + pieces[1]
    assert res[1].reused_tokens == len(pieces[0]) + 2 and res[1].seen_tokens == len(whole)
    fresh, _ = generate(model, whole, 3, stop_tokens=tok.eos_token_ids)
    assert res[1].prediction == tok.decode(fresh[0]).strip()
    # an answer that ends on a stop token (here the answer's second token, made a stop): no EOS, the stop not kept
    stopping = dataclasses.replace(tok, eos_token_ids=(answer[1],) + tok.eos_token_ids)
    res = run_example(
        model, stopping, "scbench_kv", kv_row, "multi-turn", max_new_tokens_cap=3, disable_golden_context=True
    )
    assert res[0].new_tokens == 2 and res[1].reused_tokens == len(pieces[0]) + 1
    assert res[1].prefilled_tokens == len(pieces[1]) and res[1].seen_tokens == len(pieces[0]) + 1 + len(pieces[1])


def test_multi_request_every_query_starts_from_the_shared_context(smollm2, kv_row):
    model, tok = smollm2
    res = run_example(model, tok, "scbench_kv", kv_row, "multi-request", max_new_tokens_cap=6)
    assert res[0].reused_tokens == res[1].reused_tokens > 0
    prefix, turns = prompts.multi_request_prompts("scbench_kv", kv_row)
    assert [r.prefilled_tokens for r in res] == [len(tok.encode(t.text, add_special_tokens=False)) for t in turns]


def test_compression_stays_applied_across_turns(smollm2, kv_row):
    model, tok = smollm2
    small = model.with_transforms(cache_transform=SnapKVPress(capacity=64, window_size=8))
    res = run_example(small, tok, "scbench_kv", kv_row, "multi-turn", max_new_tokens_cap=4)
    assert all(r.cache_tokens == 64 for r in res) and res[1].reused_tokens == 64
    assert res[1].seen_tokens > 300
    with pytest.raises(ValueError, match="mode must be"):
        run_example(model, tok, "scbench_kv", kv_row, "both")


def test_chat_template_pieces_are_the_original_prompts(smollm2, kv_row):
    """With --use_chat_template the ids fed per turn decode to SCBench's own rendered prompts, in both modes."""
    _, tok = smollm2
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)
    for mode in ("multi-turn", "multi-request"):
        shared, pieces, turns = token_pieces(tok, "scbench_kv", kv_row, mode, use_chat_template=True)
        want = prompts.original_prompts("scbench_kv", kv_row, mode=mode, tokenizer=tok)
        got = ([dec(shared)] if shared is not None else []) + [dec(p) for p in pieces]
        assert got == want and len(turns) == 2
        assert want[-1].endswith("<|im_start|>assistant\n")
        if mode == "multi-turn":  # the golden history: turn 0's answer opens turn 1
            assert want[1].startswith(prompts.answer_text(turns[0].answer))


def test_chat_template_multi_turn_equals_a_fresh_run(smollm2, kv_row):
    model, tok = smollm2
    res = run_example(model, tok, "scbench_kv", kv_row, "multi-turn", max_new_tokens_cap=6, use_chat_template=True)
    _, pieces, _ = token_pieces(tok, "scbench_kv", kv_row, "multi-turn", use_chat_template=True)
    whole = pieces[0] + pieces[1]
    assert res[1].reused_tokens == len(pieces[0]) and res[1].seen_tokens == len(whole)
    fresh, _ = generate(model, whole, 6, stop_tokens=tok.eos_token_ids)
    assert res[1].prediction == tok.decode(fresh[0]).strip()


def test_first_prompt_is_cut_in_the_middle_to_scbench_budget(smollm2, kv_row):
    _, tok = smollm2
    for chat in (False, True):
        _, full, _ = token_pieces(tok, "scbench_kv", kv_row, "multi-turn", use_chat_template=chat)
        _, cut, turns = token_pieces(
            tok, "scbench_kv", kv_row, "multi-turn", use_chat_template=chat, max_seq_length=400
        )
        room = prompts.max_input_length("scbench_kv", 400, 2)  # 400 - 150 * 2 = 100 tokens
        assert room - 1 <= len(cut[0]) <= room < len(full[0]) and cut[1:] == full[1:]  # odd: one fewer
        assert cut[0][-20:] == full[0][-20:] and cut[0][:20] == full[0][:20]


def test_cli_two_tasks_two_methods_both_modes_then_resume(smollm2, tmp_path, capsys, monkeypatch):
    """The whole job: results appended per example, tables and plot written; a rerun (as after a kill) skips
    what is done, so nothing is duplicated or lost; a rerun with other settings stops before loading the model."""
    from lcjax.jobs import scbench
    from lcjax.scbench.results import read_results

    argv = [
        "--task",
        "scbench_kv,scbench_mf",
        "--kv_type",
        "dense,snapkv",
        "--kv_budget",
        "64",
        "--max_turns",
        "2",
        "--max_seq_length",
        "1600",
        "--max_new_tokens_cap",
        "3",
        "--output_dir",
        str(tmp_path),
    ]
    scbench.main(argv)
    rows = read_results(tmp_path / "results.jsonl")
    keys = {(r["task"], r["method"], r["mode"]) for r in rows}
    assert len(rows) == 8 and len(keys) == 8 and all(len(r["turns"]) == 2 for r in rows)
    assert all((tmp_path / f).exists() for f in ("scores.md", "scores.csv", "score_by_turn.png", "score_by_method.png"))
    snap = [r for r in rows if r["method"] == "dense+snapkv" and r["mode"] == "multi-turn"]
    assert all(t["cache_tokens"] == 64 for r in snap for t in r["turns"])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:7]) + "\n")  # as if killed after 7 examples
    capsys.readouterr()
    scbench.main(argv)
    assert "7 already in" in capsys.readouterr().out
    again = read_results(tmp_path / "results.jsonl")
    assert len(again) == 8 and {(r["task"], r["method"], r["mode"]) for r in again} == keys
    assert "| scbench_kv | multi-turn |" in (tmp_path / "scores.md").read_text()
    assert all(r["settings"]["use_chat_template"] is True for r in again)  # SmolLM2 has a template

    def no_load(*args, **kwargs):
        raise AssertionError("the settings check should come before the model loads")

    monkeypatch.setattr(lcjax, "load_model", no_load)
    with pytest.raises(SystemExit, match="other settings .*kv_budget: 64 there, 32 now"):
        scbench.main(argv[:5] + ["32"] + argv[6:])


def test_method_lists_take_scbench_names():
    from lcjax.jobs.scbench import parse_args

    grid = parse_args(["--attn_type", "vllm,vllm_minference", "--kv_type", "dense,snapkv"]).method_pairs
    assert grid == [("dense", "dense"), ("dense", "snapkv"), ("minference", "dense"), ("minference", "snapkv")]
    listed = parse_args(["--methods", "dense,a_shape,quest,vllm_tri_shape+kivi,quest"]).method_pairs
    assert listed == [("dense", "dense"), ("a_shape", "dense"), ("dense", "quest"), ("tri_shape", "kivi")]
    with pytest.raises(SystemExit):
        parse_args(["--methods", "snapkv+a_shape"])  # a cache method where attention goes
