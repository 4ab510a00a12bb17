"""Checks of the token ids and lengths a user hands the model, on the host before any compiled call.

Inside a jitted call nothing can raise, and a bad id does not fail there: an id past the vocabulary reads NaN
embeddings (and NaN logits), a negative one wraps around to the last rows, a float is truncated. So `prefill`,
`extend` and `generate` pass their inputs through `token_batch` first; each error names the input and the fix.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np


def _shown(values, limit: int = 8) -> str:
    values = list(values)
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(str(v) for v in values[:limit]) + more


def _as_array(tokens, name: str) -> np.ndarray:
    """`tokens` as a numpy array; ragged Python lists get an error that shows how to pad them."""
    if (
        isinstance(tokens, (list, tuple))
        and tokens
        and all(isinstance(row, (list, tuple, np.ndarray)) for row in tokens)
    ):
        row_lengths = [len(row) for row in tokens]
        if len(set(row_lengths)) > 1:
            raise ValueError(
                f"{name}: rows of different lengths ({_shown(row_lengths)}); right-pad them to one length with "
                f"any valid id (e.g. 0) and pass lengths=[{_shown(row_lengths)}] so the padding is ignored."
            )
    return np.asarray(tokens)


def token_batch(
    tokens, lengths, vocab_size: int, name: str = "tokens", batch: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """int32 `[batch, seq]` ids and int32 `[batch]` lengths, checked: integer ids in `[0, vocab_size)`, at least one
    token per row, lengths in `1..seq` (default: every row full), and `batch` rows when given.

    tokens: a list of ids (one sequence), a list of equal-length lists, or an integer array `[batch, seq]`.
    Raises ValueError naming the input and the fix. Values traced inside `jax.jit`, and arrays spread over hosts
    (which no one host can read whole), pass through unchecked."""
    unreadable = lambda x: isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
    if unreadable(tokens) or unreadable(lengths):
        if lengths is None:
            lengths = jax.numpy.full(tokens.shape[:1], tokens.shape[1], jax.numpy.int32)
        return tokens, lengths
    ids = _as_array(tokens, name)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"{name} must be a list of ids or [batch, seq]; got shape {ids.shape}.")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer token ids, got {ids.dtype} (e.g. {_shown(ids.reshape(-1)[:4])}); "
            "encode text with the tokenizer, or cast ids that are whole numbers with .astype(int)."
        )
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: every sequence needs at least one token.")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(
            f"{name} has {ids.shape[0]} sequence(s) but the cache holds {batch}; fork the cache "
            f"(cache.fork(n)) to continue one context several ways."
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(
            f"{name}: ids must be in [0, {vocab_size}) (the model's vocab_size), got {_shown(np.unique(ids[bad]))}; "
            "pad with a valid id (e.g. 0) and give lengths= instead of a negative or out-of-range pad."
        )
    rows, seq = ids.shape
    if lengths is None:
        return ids.astype(np.int32), np.full((rows,), seq, np.int32)
    lens = np.asarray(lengths)
    if lens.ndim == 0:
        lens = lens[None]
    if lens.shape != (rows,):
        raise ValueError(f"lengths must hold one length per sequence, [{rows}]; got shape {lens.shape}.")
    if not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got {lens.dtype}.")
    if (lens < 1).any() or (lens > seq).any():
        raise ValueError(
            f"lengths must be in 1..{seq} (the padded row length); got {_shown(lens.tolist())}. A length counts "
            "the real tokens at the start of its row; rows are right-padded."
        )
    return ids.astype(np.int32), lens.astype(np.int32)


def warn_past_context(positions: int, max_position_embeddings: int, scales: bool, stacklevel: int = 2) -> None:
    """Warns when a call reaches past the positions the model was trained on, unless its position transform scales
    past them (once per call site under Python's default warning filter); `stacklevel` as `warnings.warn`'s, from
    the caller of this function."""
    if scales or positions <= max_position_embeddings:
        return
    warnings.warn(
        f"positions past the model's max_position_embeddings={max_position_embeddings}: quality degrades past the "
        "trained context. A position transform that scales extends it: model.with_transforms(positions=...) "
        "with lcjax.positions.linear, dynamic_ntk, yarn or longrope.",
        stacklevel=stacklevel + 1,
    )
