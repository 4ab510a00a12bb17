"""Token samplers: frozen (hashable) dataclasses, so a sampler is a static argument of the jitted decode loop.

Each maps float32 logits `[batch, vocab]` and a PRNG key to int32 tokens `[batch]`. Temperature divides the
logits first; `TopK` keeps the k largest logits, `TopP` the smallest set of most likely tokens whose
probability reaches p (nucleus sampling, as transformers' `TopPLogitsWarper` keeps it: every token whose
preceding cumulative probability is below p, so at least one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (ties: the lowest id)."""

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {temperature}.")


class _Sampling:
    """Shared draw: scale by `self.temperature`, keep `self.keep(scaled)`, sample from the softmax."""

    temperature: float

    def keep(self, logits: jax.Array) -> jax.Array:
        """bool `[batch, vocab]`: the tokens this sampler may draw (logits already scaled)."""
        return jnp.isfinite(logits)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        return jax.random.categorical(key, jnp.where(self.keep(scaled), scaled, -jnp.inf)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature(_Sampling):
    """Samples from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)


@dataclasses.dataclass(frozen=True)
class TopK(_Sampling):
    """Samples among the k most likely tokens (ties at the k-th logit are all kept)."""

    k: int = 50
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if self.k < 1:
            raise ValueError(f"TopK needs k >= 1, got {self.k}.")

    def keep(self, logits: jax.Array) -> jax.Array:
        kth = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))[0][..., -1:]
        return logits >= kth


@dataclasses.dataclass(frozen=True)
class TopP(_Sampling):
    """Nucleus sampling: the most likely tokens until their probability reaches p."""

    p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP needs 0 < p <= 1, got {self.p}.")

    def keep(self, logits: jax.Array) -> jax.Array:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        keep_sorted = before < self.p
        rows = jnp.arange(logits.shape[0])[:, None]
        return jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)


Sampler = Greedy | Temperature | TopK | TopP
