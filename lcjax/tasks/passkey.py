"""Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden at a chosen depth of filler text.

Deterministic per seed; the prompt is sized in the model's own tokens. The filler is varied prose
(so attention patterns are not trivially periodic) built from a fixed sentence bank.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcjax.tokenizer import Tokenizer

_SUBJECTS = (
    "The river",
    "A small town",
    "The old library",
    "Every winter",
    "The mountain road",
    "A quiet harbour",
    "The market square",
    "Our garden",
    "The northern forest",
    "A train station",
)
_VERBS = (
    "changes slowly",
    "is busy in the morning",
    "looks different at dusk",
    "keeps its secrets",
    "welcomes travellers",
    "was rebuilt last century",
    "smells of rain",
    "hums with insects",
    "is painted blue",
    "has a long history",
)
_TAILS = (
    "and nobody minds.",
    "as the locals say.",
    "according to the guidebook.",
    "for reasons unknown.",
    "which surprises visitors.",
    "every single year.",
    "in a gentle way.",
    "without exception.",
)


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    prompt_ids: list[int]
    answer: str
    depth: float


def _filler(rng: np.random.Generator, n_sentences: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TAILS)}" for _ in range(n_sentences)]


def passkey_sample(tokenizer: Tokenizer, target_tokens: int, depth: float, seed: int) -> PasskeySample:
    """A chat prompt of about `target_tokens` tokens whose answer is a 5-digit passkey at `depth` in [0, 1]."""
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? Answer with the number only."
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": needle + "\n\n" + question}]))
    per_sentence = np.mean([len(tokenizer.encode(" " + s, add_special_tokens=False)) for s in _filler(rng, 32)])
    sentences = _filler(rng, max(1, int((target_tokens - overhead) / per_sentence)))
    at = int(round(depth * len(sentences)))
    text = " ".join(sentences[:at] + [needle] + sentences[at:])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text + "\n\n" + question}])
    return PasskeySample(ids, key, depth)


def passkey_score(prediction: str, answer: str) -> float:
    """1.0 when the passkey appears in the prediction."""
    return float(answer in prediction)
