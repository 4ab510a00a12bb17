"""Bad token inputs end in an error naming the input and the fix before any compiled work; a call past the
trained context warns once unless the position transform scales past it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcjax
from lcjax import positions
from lcjax.config import ModelConfig
from lcjax.generate import generate

VOCAB = 64
CONFIG = ModelConfig(
    family="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return lcjax.Transformer.init(CONFIG, jax.random.key(0), dtype=jnp.float32)


CALLS = {
    "prefill": lambda m, tokens, **kw: m.prefill(tokens, **kw),
    "generate": lambda m, tokens, **kw: generate(m, tokens, 2, **kw),
    "logits": lambda m, tokens, **kw: m(tokens, **kw),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "tokens,kw,match",
    [
        ([[1, VOCAB]], {}, rf"ids must be in \[0, {VOCAB}\) \(the model's vocab_size\), got {VOCAB}"),
        ([[3, -1, 2]], {}, r"got -1; pad with a valid id"),
        ([[1.7, 2.2]], {}, r"must be integer token ids, got float64"),
        ([[]], {}, r"is empty: every sequence needs at least one token"),
        ([[1, 2, 3], [4]], {}, r"rows of different lengths \(3, 1\).*lengths=\[3, 1\]"),
        ([[1, 2, 3], [4, 0, 0]], {"lengths": [3, 4]}, r"lengths must be in 1\.\.3 .*got 3, 4"),
        ([[1, 2, 3], [4, 0, 0]], {"lengths": [3, 0]}, r"lengths must be in 1\.\.3 .*got 3, 0"),
        ([[1, 2, 3], [4, 0, 0]], {"lengths": [3]}, r"one length per sequence, \[2\]; got shape \(1,\)"),
    ],
)
def test_bad_tokens_are_named_before_any_work(model, call, tokens, kw, match):
    with pytest.raises(ValueError, match=match):
        CALLS[call](model, tokens, **kw)


def test_extend_names_a_batch_that_does_not_match_the_cache(model):
    _, cache = model.prefill([[1, 2, 3]], capacity=16)
    with pytest.raises(ValueError, match=r"has 2 sequence\(s\) but the cache holds 1; fork the cache"):
        model.extend([[4], [5]], cache)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
        model.extend([[VOCAB + 3]], cache)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate(model, [1, 2], 0)


def test_valid_ragged_batch_with_lengths_runs(model):
    """The fix the messages name works: right-padded rows with lengths= give each row's own logits."""
    logits, _ = model.prefill([[1, 2, 3], [4, 5, 0]], lengths=[3, 2], logits="last")
    alone, _ = model.prefill([[4, 5]], logits="last")
    np.testing.assert_allclose(logits[1], alone[0], atol=1e-5)


def test_past_the_trained_context_warns_once_unless_positions_scale(model):
    long = np.arange(40) % VOCAB  # max_position_embeddings is 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # one warning for the call site, however often it runs
            model.prefill([long])
        model.prefill([long[:30]])  # within the limit
    past = [w for w in caught if "max_position_embeddings=32" in str(w.message)]
    assert len(past) == 1 and "linear, dynamic_ntk, yarn or longrope" in str(past[0].message)
    assert past[0].filename == __file__  # it points at the caller's line, not into lcjax
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail here
        dynamic = model.with_transforms(positions=positions.dynamic_ntk(8, 10000.0, 2.0, 32))
        dynamic.prefill([long])
        yarn = model.with_transforms(positions=positions.yarn(8, 10000.0, 4.0, 32))
        generate(yarn, long, 4)


def test_tokenizer_decode_names_ids_outside_its_vocabulary(fixtures_dir):
    tokenizer = lcjax.load_tokenizer(fixtures_dir / "hf" / "llama")
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.decode(ids).endswith("Paris.")
    with pytest.raises(ValueError, match=rf"ids \[{tokenizer.vocab_size}\] are not in \[0, {tokenizer.vocab_size}\)"):
        tokenizer.decode(ids + [tokenizer.vocab_size])
    with pytest.raises(ValueError, match="integer token ids, got float64"):
        tokenizer.decode([1.5])


def test_traced_tokens_pass_unchecked_inside_jit(model):
    """Inside `jax.jit` nothing can be read on the host: prefill and the model's logits take traced ids (and
    default lengths) as they are, and compute what the eager call does."""
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    eager, _ = model.prefill(tokens, capacity=16)
    traced = jax.jit(lambda t: model.prefill(t, capacity=16)[0])(tokens)
    np.testing.assert_allclose(traced, eager, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda t: model(t))(tokens), model(tokens), atol=1e-6)
