"""Key-value retrieval (Liu et al. 2023, "Lost in the Middle"): a JSON object of random UUID keys and values; the
question names one key, at a chosen depth of the object, and the answer is its value.

Deterministic per seed; the object is sized in the model's own tokens. Harder than passkey: every line looks
alike, so the model must match 36 characters exactly rather than spot the one odd sentence.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import numpy as np

from lcjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class KVSample:
    prompt_ids: list[int]
    answer: str
    depth: float


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def kv_sample(tokenizer: Tokenizer, target_tokens: int, depth: float, seed: int) -> KVSample:
    """A chat prompt of about `target_tokens` tokens asking for the value of the key at `depth` in [0, 1]."""
    rng = np.random.default_rng(seed)

    def prompt(pairs: list[tuple[str, str]], key: str) -> list[int]:
        data = json.dumps(dict(pairs), indent=0)
        question = f"Extract the value for the key {json.dumps(key)} from the JSON object below.\n\n{data}\n\n"
        question += f"Key: {json.dumps(key)}\nAnswer with the value only."
        return tokenizer.apply_chat_template([{"role": "user", "content": question}])

    probe = [(_uuid(rng), _uuid(rng)) for _ in range(32)]
    per_pair = (len(prompt(probe, probe[0][0])) - len(prompt(probe[:16], probe[0][0]))) / 16
    overhead = len(prompt([], probe[0][0]))
    n = max(1, int((target_tokens - overhead) / per_pair))
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(n)]
    key, value = pairs[min(n - 1, int(round(depth * (n - 1))))]
    return KVSample(prompt(pairs, key), value, depth)
