"""Text <-> token ids and chat prompts, over the Rust `tokenizers` library.

`Tokenizer.from_hf_dir` reads a transformers tokenizer directory and `Tokenizer.save_hf_dir` writes one;
`Tokenizer.from_gguf` rebuilds the same byte-level BPE tokenizer from the vocabulary, merges and
pre-tokenizer name a GGUF file carries.
Chat templates are rendered with Jinja in a sandbox, with the helpers transformers gives templates
(`raise_exception`, `strftime_now`, a non-escaping `tojson`, loop controls).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from lcjax.loading.gguf import gguf_field, open_gguf

# Tokens that chat templates end a turn with; generation should stop on them as well as on eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Split regexes of the byte-level pre-tokenizers, by `tokenizer.ggml.pre` (llama.cpp's names).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    # GPT-2's regex after splitting every digit off on its own
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "dbrx": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts and chat template a model needs.

    eos_token_ids: ids that end generation (eos, then end-of-turn tokens the chat template uses).
    add_bos: whether `encode(..., add_special_tokens=True)` starts with `bos_token_id`.
    unk_token_id: the id transformers reports as `unk_token_id` (byte-level BPE never produces it).
    """

    tokenizer: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    chat_template: str | None = None
    add_bos: bool = False
    unk_token_id: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token(self, token_id: int | None) -> str | None:
        """The token string of an id (None for None or an unknown id)."""
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, bos is prepended when the model wants it."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list of ints or a 1-D integer array, each in `[0, vocab_size)`)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"decode takes integer token ids, got {ids.dtype}.")
        bad = sorted({int(i) for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(f"decode: ids {bad[:8]} are not in [0, {self.vocab_size}) (this tokenizer's vocab_size).")
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Returns the prompt's token ids (tokenised without adding special tokens, since the template
        writes them) or, with `tokenize=False`, the prompt string. Extra keyword arguments reach the
        template as variables (e.g. `enable_thinking=False`).
        """
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF's tokenizer.chat_template); format the prompt "
                "yourself and call encode()."
            )
        variables = {
            "bos_token": self.token(self.bos_token_id) or "",
            "eos_token": self.token(self.eos_token_id) or "",
            "pad_token": self.token(self.pad_token_id) or "",
            **template_kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        if tools is not None:
            variables["tools"] = [dict(t) for t in tools]
        text = self._template.render(**variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        return _compile_template(self.chat_template)

    def save_hf_dir(self, directory: str | os.PathLike, model_max_length: int | None = None) -> list[Path]:
        """Writes the files `from_hf_dir` and transformers' `AutoTokenizer.from_pretrained` read; returns them.

        `tokenizer.json` (bos in its post-processor where `encode` prepends one, since transformers reads no
        `add_bos` flag of lcjax's), `tokenizer_config.json` (special tokens, chat template, `model_max_length`:
        the model's longest input, e.g. its `max_position_embeddings`) and `special_tokens_map.json`. Eos ids after
        the first that are not end-of-turn tokens of the template live in the model's `generation_config.json`,
        which `lcjax.loading.export.save_checkpoint` writes.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())  # a copy: this tokenizer stays as it was
        bos = self.token(self.bos_token_id)
        if self.add_bos and bos is not None and not _adds_bos(tok, self.bos_token_id):
            template = _bos_processor(bos, self.bos_token_id)
            tok.post_processor = (
                template if tok.post_processor is None else processors.Sequence([tok.post_processor, template])
            )
        ids = {"bos": self.bos_token_id, "eos": self.eos_token_id, "unk": self.unk_token_id, "pad": self.pad_token_id}
        special = {f"{name}_token": token for name, i in ids.items() if (token := self.token(i)) is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # transformers' class for a bare tokenizer.json (4 and 5)
            **special,
            "clean_up_tokenization_spaces": False,  # decode as `tokenizers` does, as `decode` here does
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {"tokenizer_config.json": config, "special_tokens_map.json": special}
        tok.save(str(directory / "tokenizer.json"))
        for name, value in files.items():
            (directory / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [directory / "tokenizer.json", *(directory / name for name in files)]

    # ---- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Reads a transformers tokenizer directory.

        Needs `tokenizer.json`; reads `tokenizer_config.json` (chat_template, bos/eos/pad tokens,
        add_bos_token), `chat_template.jinja` (where transformers 5 saves the template),
        `special_tokens_map.json`, and `generation_config.json`/`config.json` (extra eos ids) when present.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json; lcjax needs a fast-tokenizer file (save one "
                "with transformers' tokenizer.save_pretrained) or a GGUF file."
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ValueError(f"{tokenizer_file}: not a valid tokenizers file ({e}).") from e
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")

        def token_id(key: str) -> int | None:
            for source in (config, special_map):
                value = source.get(key)
                if isinstance(value, dict):  # a serialised AddedToken
                    value = value.get("content")
                if isinstance(value, str) and tok.token_to_id(value) is not None:
                    return tok.token_to_id(value)
            return None

        template = _hf_chat_template(path, config)
        bos = token_id("bos_token")
        if bos is None:
            bos = generation.get("bos_token_id", model_config.get("bos_token_id"))
        eos = [token_id("eos_token")]
        for source in (generation, model_config):
            value = source.get("eos_token_id")
            eos.extend(value if isinstance(value, list) else [value])
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # whatever tokenizer.json's post-processor does
            add_bos = bos is not None and _adds_bos(tok, bos)
        return cls(
            tokenizer=tok,
            bos_token_id=bos,
            eos_token_ids=_eos_ids(tok, eos, template),
            pad_token_id=token_id("pad_token"),
            chat_template=template,
            add_bos=add_bos,
            unk_token_id=token_id("unk_token"),
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, reader=None) -> "Tokenizer":
        """Builds the tokenizer stored in a GGUF file's `tokenizer.*` metadata.

        Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE) with pre-tokenizers smollm/starcoder,
        llama-bpe (Llama 3), qwen2 and gpt-2/default. Control (type 3) and user-defined (type 4) tokens
        become added tokens so they are never split. SentencePiece files (`"llama"`) raise
        NotImplementedError.
        """

        path = Path(path)
        reader = reader or open_gguf(path)

        def field(key: str, default: Any = None) -> Any:
            return gguf_field(reader, f"tokenizer.{key}", default)

        model = field("ggml.model")
        if model is None:
            raise ValueError(
                f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model key); load the "
                "tokenizer from the model's transformers directory with Tokenizer.from_hf_dir."
            )
        if model != "gpt2":
            raise NotImplementedError(
                f"{path}: tokenizer.ggml.model is {model!r}; lcjax builds only byte-level BPE ('gpt2') "
                f"tokenizers from GGUF. {'SentencePiece (llama) is not implemented yet; ' if model == 'llama' else ''}"
                "use Tokenizer.from_hf_dir on the original model's tokenizer files instead."
            )
        tokens = field("ggml.tokens")
        merges = field("ggml.merges")
        if not tokens or merges is None:
            raise ValueError(
                f"{path}: a gpt2 GGUF tokenizer needs tokenizer.ggml.tokens and "
                "tokenizer.ggml.merges; the file lacks one of them."
            )
        types = field("ggml.token_type") or [1] * len(tokens)
        pre = field("ggml.pre", "default")
        tok = _byte_level_bpe(path, tokens, merges, types, pre)

        def opt_id(key: str) -> int | None:
            value = field(f"ggml.{key}_token_id")
            return None if value is None else int(value)

        bos = opt_id("bos")
        add_bos = bool(field("ggml.add_bos_token", False)) and bos is not None
        if add_bos:
            tok.post_processor = _bos_processor(tokens[bos], bos)
        template = field("chat_template")
        return cls(
            tokenizer=tok,
            bos_token_id=bos,
            eos_token_ids=_eos_ids(tok, [opt_id("eos"), opt_id("eot"), opt_id("eom")], template),
            pad_token_id=opt_id("padding"),
            chat_template=template,
            add_bos=add_bos,
            unk_token_id=opt_id("unknown"),
        )


def _byte_level_bpe(
    path: Path, tokens: list[str], merges: list[str], types: list[int], pre: str
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equal to the one llama.cpp builds for `pre`."""
    kind = _PRE_TOKENIZERS.get(pre)
    if kind is None:
        warnings.warn(
            f"{path}: unknown GGUF pre-tokenizer {pre!r}; using GPT-2's. Known: "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}. Token ids may differ from the original model's.",
            stacklevel=3,
        )
        kind = "gpt2"
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer merge {merge!r} is not two space-separated tokens.")
        pairs.append((parts[0], parts[1]))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # keep the first id of a duplicated string
    # Llama 3's tokenizer takes a whole pre-token that is in the vocabulary without merging.
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=kind == "llama3", fuse_unk=False)
    tok = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level]
        )
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalises to NFC first
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise ValueError(
            f"{path}: rebuilding the tokenizer gave {tok.get_vocab_size(with_added_tokens=True)} "
            f"ids for {len(vocab)} distinct tokens; the file's token list is inconsistent."
        )
    return tok


def _bos_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    """A post-processor that starts each sequence with bos, as transformers builds for `add_bos_token`."""
    return processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _adds_bos(tok: tokenizers.Tokenizer, bos_id: int) -> bool:
    """Whether the tokenizer's own post-processor prepends `bos_id`."""
    return tok.encode("a").ids[:1] == [bos_id]


def _eos_ids(tok: tokenizers.Tokenizer, candidates: Sequence[int | None], template: str | None) -> tuple[int, ...]:
    """Distinct eos ids: the given ones, then end-of-turn tokens the chat template writes."""
    ids = [int(i) for i in candidates if i is not None]
    for text in END_OF_TURN_TOKENS:
        token_id = tok.token_to_id(text)
        if template and text in template and token_id is not None:
            ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e
    return value if isinstance(value, dict) else {}


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (transformers 5) first, then tokenizer_config.json's key, then chat_template.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


# ---- chat templates ---------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant spans for training); renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"The chat template does not parse (line {e.lineno}: {e.message}).") from e
