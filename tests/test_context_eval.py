"""Context-extension evaluation: sliding windows that score every token once, window losses against float64
numpy, and the job over every method on a tiny checkpoint, resumed from its own output."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import ModelConfig
from lcjax.jobs import context_eval
from lcjax.models.transformer import Transformer
from lcjax.train.perplexity import perplexity, sliding_windows, window_losses


@pytest.mark.parametrize("bos", [None, 7])
@pytest.mark.parametrize("length, stride", [(8, None), (8, 3), (9, 5)])
def test_windows_score_each_token_once_with_the_context_the_stride_leaves(length, stride, bos):
    ids = np.arange(100, 157)
    windows, scored = sliding_windows(ids, length, stride, bos)
    text = length - (bos is not None)
    stride = text if stride is None else stride
    assert windows.shape == scored.shape and windows.shape[1] == length
    counts = {}
    for w, s in zip(windows, scored):
        if bos is not None:
            assert w[0] == bos and not s[0]
        for t in np.flatnonzero(s):
            counts[w[t]] = counts.get(w[t], 0) + 1
            context = t - (bos is not None)  # text tokens before it in its window
            assert context >= (0 if w[t] - 100 < text else text - stride)
    assert set(counts.values()) == {1}
    end = 100 + (len(windows) - 1) * stride + text  # one past the last window's last token
    if bos is not None:  # the BOS predicts each window's first token: every token is scored
        want = set(range(100, end))
    elif stride == text:  # windows side by side: nothing predicts a window's first token
        want = set(range(100, end)) - {100 + k * stride for k in range(len(windows))}
    else:  # overlapping: only the stream's first token goes unpredicted
        want = set(range(101, end))
    assert set(counts) == want
    with pytest.raises(ValueError, match="fewer than one window"):
        sliding_windows(ids[:5], length, stride, bos)


def test_window_losses_equal_float64_cross_entropy_of_the_models_logits():
    config = ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    model = Transformer.init(config, jax.random.key(3), dtype=jnp.float32, std=0.3)
    ids = np.random.default_rng(0).integers(0, 64, 60)
    windows, scored = sliding_windows(ids, 16, 6, bos=1)
    losses = window_losses(model, windows, scored, batch=3)  # 8 windows: the last call padded
    logits = np.asarray(model(jnp.asarray(windows)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1)[..., 0]
    want = (nll * scored[:, 1:]).sum(1) / scored[:, 1:].sum(1)
    np.testing.assert_allclose(losses, want, rtol=2e-5)
    np.testing.assert_allclose(perplexity(losses), np.exp(want.mean()), rtol=2e-5)


@pytest.fixture
def tiny_model(tmp_path, fixtures_dir):
    """A plain-RoPE checkpoint trained on 256 positions (the tied Llama fixture) with a tokenizer, and a corpus."""
    model = tmp_path / "model"
    shutil.copytree(fixtures_dir / "hf" / "llama_tied", model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures_dir / "hf" / "llama" / name, model / name)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    (corpus / "b.txt").write_text("Pack my box with five dozen liquor jugs. " * 400)
    return model, corpus


def test_the_job_measures_each_method_and_resumes_from_its_rows(tiny_model, tmp_path, capsys):
    from lcjax.config import with_longrope
    from lcjax.load import load_model
    from lcjax.train.longrope_search import write_factors

    model, corpus = tiny_model
    plain, _ = load_model(model, dtype="float32")
    factors = tmp_path / "factors.json"
    write_factors(factors, with_longrope(plain.config, np.linspace(1, 4, 8), 1024))
    out = tmp_path / "rows.jsonl"
    argv = ["--model", str(model), "--target-length", "1024", "--lengths", "128", "512", "--methods", "original",
            "pi", "ntk", f"longrope={factors}", "--corpus", str(corpus), "--held-out", "0.5", "--windows", "2",
            "--passkeys", "0", "--dtype", "float32", "--output", str(out)]  # fmt: skip
    context_eval.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["length"]) for r in rows] == [
        (m, n) for m in ("original", "pi", "ntk", f"longrope={factors}") for n in (128, 512)
    ]
    ppl = {(r["method"], r["length"]): r["value"] for r in rows}
    assert len(set(ppl.values())) == len(ppl)  # each method changes the positions, so every value differs
    table = capsys.readouterr().out
    context_eval.main(argv)  # everything is on file: nothing is measured again
    assert out.read_text().count("\n") == len(rows)
    assert capsys.readouterr().out.splitlines()[-6:] == table.splitlines()[-6:]
    with pytest.raises(SystemExit, match="is not a LongRoPE factors file"):
        context_eval.main(argv[:8] + ["longrope=" + str(corpus / "a.txt")] + argv[8:])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_prompt_asks_for_the_value_of_a_key_at_its_depth_and_fits_the_length(depth, fixtures_dir):
    import re

    from lcjax.tasks.kv_retrieval import kv_sample
    from lcjax.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(fixtures_dir / "hf" / "llama")
    s = kv_sample(tok, 1500, depth, seed=3)
    text = tok.decode(s.prompt_ids)
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    key = re.search(r'Key: "([0-9a-f-]{36})"', text).group(1)
    keys = list(data)
    assert data[key] == s.answer and keys.index(key) == round(depth * (len(keys) - 1))
    assert 1300 <= len(s.prompt_ids) <= 1500


def test_retrieval_prompts_padded_to_one_shape_answer_as_unpadded(tiny_model):
    from lcjax.generate import generate
    from lcjax.load import load_model
    from lcjax.tasks.passkey import passkey_sample

    model, tok = load_model(tiny_model[0], dtype="float32")
    answers = context_eval.retrieval_answers(model, tok, "passkey", 240, 2)
    for i, (got, want) in enumerate(answers):
        s = passkey_sample(tok, 240 - 12 - 8, float(i), seed=i)
        (new,), _ = generate(model, s.prompt_ids, 12, stop_tokens=tok.eos_token_ids)
        assert (got, want) == (tok.decode(new), s.answer)
