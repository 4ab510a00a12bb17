"""The built-in real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

import json

import numpy as np
from conftest import FIXTURES

from lcjax.generate import generate

REF = FIXTURES / "smollm2"


def test_same_argmax_as_transformers_at_every_position(smollm2):
    model, _ = smollm2
    ref = np.load(REF / "reference.npz")
    logits = np.asarray(model(ref["prompt_ids"]))[0]
    np.testing.assert_array_equal(logits.argmax(-1), ref["argmax"])
    top5 = np.take_along_axis(logits, ref["top5_ids"], axis=-1)
    np.testing.assert_allclose(top5, ref["top5_logits"], atol=2e-3)
    np.testing.assert_allclose(logits[-1], ref["last_logits"], atol=2e-3)


def test_greedy_answer_matches_transformers(smollm2):
    model, tokenizer = smollm2
    ref = np.load(REF / "reference.npz")
    want = ref["greedy_ids"][0].tolist()
    (tokens,), _ = generate(model, ref["prompt_ids"][0], len(want), stop_tokens=())  # transformers' fixed length
    assert tokens == want
    # by default generation ends with the answer's end-of-turn token, as transformers' generation config has it
    (answer,), _ = generate(model, ref["prompt_ids"][0], len(want))
    end = next(i for i, t in enumerate(want) if t in tokenizer.eos_token_ids)
    assert answer == want[: end + 1] and tokenizer.token(answer[-1]) == "<|im_end|>"
    expected = json.loads((REF / "tokenizer_reference.json").read_text())
    assert "Paris" in tokenizer.decode(tokens)
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            add_generation_prompt=True,
        )
        == ref["prompt_ids"][0].tolist()
    )
    assert expected["chat_template"]


def test_chat_with_a_press_keeps_the_cache_bounded_across_turns(smollm2, capsys):
    """The chat job with StreamingLLM at 32 tokens: every turn's cache holds at most the budget plus the
    turn's new tokens, while the positions count every token of the conversation."""
    import re

    from lcjax.jobs import chat

    chat.main(
        [
            "--press",
            "streamingllm",
            "--press-capacity",
            "32",
            "--max-new-tokens",
            "6",
            "--prompt",
            "List three colours of the rainbow, please, and say which one you like most.",
            "--prompt",
            "Why?",
        ]
    )
    turns = re.findall(
        r"\((\d+) prompt tokens, (\d+) of them reused.*?(\d+) new tokens.*?holds (\d+) of (\d+) tokens",
        capsys.readouterr().out,
    )
    assert len(turns) == 2
    for prompt, reused, new, held, seen in (map(int, t) for t in turns):
        assert held <= 32 + new and seen == prompt + new
    assert int(turns[1][1]) > 0  # the second turn reused the compressed cache
