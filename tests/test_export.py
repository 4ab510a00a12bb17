"""Export with the tokenizer: what lcjax writes, transformers opens with the same weights, logits and token ids.

`tools/make_fixtures.py` runs this file as a script (`python tests/test_export.py DIR`) to export a tiny
deterministic model with the fixture Llama's tokenizer, and the built-in SmolLM2 with its GGUF-built tokenizer;
it loads both exports with transformers, checks them against lcjax's logits and ids written beside them, and saves
transformers' view in `fixtures/export/`. The tests re-export the same model and tokenizers and compare with it.
"""

import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from conftest import FIXTURES
from safetensors.numpy import load_file

import lcjax
from lcjax.config import ModelConfig, RopeConfig
from lcjax.loading.export import save_checkpoint
from lcjax.models.params import ParamSpec, param_specs
from lcjax.models.transformer import Transformer
from lcjax.tokenizer import Tokenizer

REFERENCE = FIXTURES / "export"
TINY_TOKENIZER = FIXTURES / "hf" / "llama"  # vocab 512, bos from its post-processor, a chat template
# vocab 512 as TINY_TOKENIZER's; llama3 rope so config.json's rope_parameters matter to the logits
CONFIG = ModelConfig(
    family="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope=RopeConfig(
        rope_type="llama3",
        theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    ),
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=0,
)
INPUT_IDS = np.random.default_rng(0).integers(5, CONFIG.vocab_size, size=(2, 16)).astype(np.int32)
STRINGS = [
    "Hello world! The quick brown fox.",
    "  leading and trailing spaces  ",
    "numbers 12345 and 3.14159",
    "héllo wörld 你好, emoji 😀👍🏽!",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x + 1\n",
]
CONVERSATION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def reference_model() -> Transformer:
    """The tiny model, drawn with numpy (whose generator, unlike jax.random's defaults, is fixed across versions):
    matrices N(0, 0.15), norms 1 + 0.1 N."""
    rng = np.random.default_rng(0)

    def draw(spec: ParamSpec) -> jax.Array:
        noise = rng.standard_normal(spec.shape, dtype=np.float32)
        return jnp.asarray(1 + 0.1 * noise if spec.init == "ones" else 0.15 * noise)

    return Transformer(jax.tree.map(draw, param_specs(CONFIG), is_leaf=lambda x: isinstance(x, ParamSpec)), CONFIG)


def reference_tokenizers() -> dict[str, Tokenizer]:
    """The fixture Llama's transformers tokenizer and, where installed, SmolLM2's, which lcjax builds from GGUF
    metadata (no transformers files of its own)."""
    found = {"tiny": Tokenizer.from_hf_dir(TINY_TOKENIZER)}
    try:
        found["smollm2"] = lcjax.load_tokenizer("smollm2-135m")
    except FileNotFoundError:
        pass
    return found


def tokenizer_view(tokenizer: Tokenizer) -> dict:
    """What a tokenizer makes of `STRINGS` and `CONVERSATION`, and its special tokens (transformers' names); the
    fixture holds the same dict as transformers computed it from the export."""
    ids = [tokenizer.encode(s) for s in STRINGS]
    return {
        "ids": ids,
        "ids_no_special": [tokenizer.encode(s, add_special_tokens=False) for s in STRINGS],
        "decoded": [tokenizer.decode(i) for i in ids],
        "chat_rendered": tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
        "chat_ids": tokenizer.apply_chat_template(CONVERSATION),
        "special_tokens": {
            f"{name}_token": tokenizer.token(i)
            for name, i in (
                ("bos", tokenizer.bos_token_id),
                ("eos", tokenizer.eos_token_id),
                ("unk", tokenizer.unk_token_id),
                ("pad", tokenizer.pad_token_id),
            )
        },
        "eos_token_ids": list(tokenizer.eos_token_ids),
    }


def tensor_digests(directory: Path) -> dict[str, str]:
    """sha256 of every tensor's float32 bytes in the directory's safetensors shards, by name."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return {
        name: hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest() for name, a in tensors.items()
    }


def reference() -> tuple[dict, dict]:
    path = REFERENCE / "reference.json"
    if not path.exists():
        pytest.fail(f"fixture {path} is missing; regenerate with tools/make_fixtures.py export")
    ref = json.loads(path.read_text(encoding="utf-8"))
    assert ref["strings"] == STRINGS and ref["conversation"] == CONVERSATION, "regenerate the export fixture"
    return ref, dict(np.load(REFERENCE / "reference.npz"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export")
    model = reference_model()
    save_checkpoint(model.params, model.config, directory, tokenizer=Tokenizer.from_hf_dir(TINY_TOKENIZER))
    return directory


def test_export_writes_the_tensors_transformers_loaded(exported):
    """Names, layout and values: a transposed or renamed tensor changes a digest or the set of names."""
    ref, _ = reference()
    assert tensor_digests(exported) == ref["tiny"]["tensor_sha256"]


def test_reloaded_export_gives_transformers_logits_and_stop_tokens(exported):
    ref, arrays = reference()
    np.testing.assert_array_equal(arrays["input_ids"], INPUT_IDS)
    model, _ = lcjax.load_model(exported, dtype="float32")
    assert model.config == CONFIG and model.stop_tokens == tuple(ref["tiny"]["eos_token_ids"])
    np.testing.assert_allclose(np.asarray(model(INPUT_IDS)), arrays["logits"], atol=2e-5, rtol=0)
    # transformers' generate stops where lcjax's does, and its tokenizer knows the model's context
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ref["tiny"]["eos_token_ids"]
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 256


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_reloaded_tokenizer_gives_transformers_ids(exported, tmp_path, name):
    """The export's tokenizer as lcjax reads it back encodes, decodes and renders the chat as transformers does,
    with transformers' special tokens and generation config's eos ids."""
    ref, _ = reference()
    if name == "tiny":
        directory = exported
    else:
        tokenizer = reference_tokenizers().get(name)
        if tokenizer is None:
            pytest.skip("the built-in model is not installed")
        directory = tmp_path
        tokenizer.save_hf_dir(directory)
    view = tokenizer_view(Tokenizer.from_hf_dir(directory))
    for key, value in ref[name].items():
        if key != "tensor_sha256":
            assert view[key] == value, key


def test_save_hf_dir_puts_bos_where_transformers_reads_it(tmp_path):
    """A tokenizer that prepends bos by lcjax's flag alone (a GGUF's add_bos_token) exports with bos in
    tokenizer.json's post-processor, the part transformers reads, and keeps the other tokens' ids."""
    tiny = Tokenizer.from_hf_dir(TINY_TOKENIZER)
    no_processor = tokenizers.Tokenizer.from_str(tiny.tokenizer.to_str())
    no_processor.post_processor = None
    flagged = Tokenizer(no_processor, bos_token_id=1, eos_token_ids=(2,), add_bos=True)
    assert flagged.encode("Hello")[0] == 1
    flagged.save_hf_dir(tmp_path)
    assert no_processor.post_processor is None  # the tokenizer saved is a copy
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["post_processor"]["type"] == "TemplateProcessing"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "model_max_length" not in config and config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    again = Tokenizer.from_hf_dir(tmp_path)
    assert [again.encode(s) for s in STRINGS] == [flagged.encode(s) for s in STRINGS]


def write_exports(out: Path) -> None:
    """For tools/make_fixtures.py: per tokenizer, an export (`out/<name>/`) and lcjax's view of it: `lcjax.json`
    (STRINGS, CONVERSATION, `tokenizer_view`), `input_ids.npy` and `lcjax_logits.npy` (float32)."""
    for name, tokenizer in reference_tokenizers().items():
        if name == "tiny":
            model, input_ids = reference_model(), INPUT_IDS
        else:
            model, tokenizer = lcjax.load_model("smollm2-135m", dtype="float32")
            input_ids = np.asarray([tokenizer.apply_chat_template(CONVERSATION)], np.int32)
        directory = out / name
        save_checkpoint(model.params, model.config, directory, tokenizer=tokenizer)
        view = {"strings": STRINGS, "conversation": CONVERSATION, "view": tokenizer_view(tokenizer)}
        (directory / "lcjax.json").write_text(json.dumps(view, ensure_ascii=False), encoding="utf-8")
        np.save(directory / "input_ids.npy", input_ids)
        np.save(directory / "lcjax_logits.npy", np.asarray(model(input_ids), np.float32))
        print(f"exported {name} to {directory}")


if __name__ == "__main__":
    write_exports(Path(sys.argv[1]))
