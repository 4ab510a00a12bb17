"""Qwen2.5-Coder-0.5B-Instruct GGUF (K-quants, qkv bias, Qwen2 tokenizer) against transformers loading the same
file. The model is a 491 MB download (`tools/get_qwen25.sh`), so this skips where it is absent (as in CI)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import lcjax
from lcjax.generate import generate

REF = FIXTURES / "qwen25"
GGUF = Path(os.environ.get("LCJAX_QWEN25_GGUF", Path.home() / ".cache/lcjax/qwen2.5-coder-0.5b-instruct.gguf"))


@pytest.fixture(scope="module")
def qwen():
    if not GGUF.exists():
        pytest.skip(f"{GGUF} absent; fetch it with tools/get_qwen25.sh")
    return lcjax.load_model(GGUF, dtype="float32")


def test_logits_and_greedy_answer_match_transformers(qwen):
    model, tokenizer = qwen
    ref = np.load(REF / "reference.npz")
    expected = json.loads((REF / "tokenizer_reference.json").read_text())
    assert model.config.family == "qwen2" and model.config.qkv_bias and not model.config.tie_word_embeddings
    ids = tokenizer.apply_chat_template(expected["conversation"], add_generation_prompt=True)
    assert ids == ref["prompt_ids"][0].tolist()
    for text, want in zip(expected["tricky_strings"], expected["tricky_ids_no_special"]):
        assert tokenizer.encode(text, add_special_tokens=False) == want
    logits = np.asarray(model(ref["prompt_ids"]))[0, -ref["argmax"].shape[0] :]
    np.testing.assert_array_equal(logits.argmax(-1), ref["argmax"])
    np.testing.assert_allclose(logits[-1], ref["last_logits"], atol=5e-3)
    (tokens,), _ = generate(model, ref["prompt_ids"][0], ref["greedy_ids"].shape[1], stop_tokens=())
    assert tokens == ref["greedy_ids"][0].tolist()
