"""Seeded stand-ins for SCBench's synthetic tasks, in SCBench's own row format.

SCBench (microsoft/MInference `scbench/`) ships its data as JSONL rows
``{"id", "context", "multi_turns": [{"input", "answer", ...}, ...]}``; the multi-task sets tag every turn with
its sub-task (``"task": "scbench_passkey" | "scbench_summary" | "scbench_kv" | "scbench_repoqa"``) and the
RepoQA sets carry ``"lang"``/``"repo"`` on the row and the needle function's ``"name"`` on each RepoQA turn.
The functions here build such rows from a seed, for the tasks whose context is synthetic, sized in the
model's own tokens: each context is grown by whole items (key-value pairs, strings, filler sentences,
numbers, top-level code statements) to the largest size whose ``count_tokens(context)`` is at most
``target_tokens``. The budget covers the ``context`` field alone; SCBench's prompt template, the turn inputs
and the generated answers come on top, so pass a target that leaves room for them.

Formats (the ``{context}``/``{input}`` slots of ``scbench/eval_utils.py``'s ``multiturn_templates``):

- ``scbench_kv``: context ``'JSON data:\\n{"<uuid>": "<uuid>", ...}'`` (InfiniteBench ``kv_retrieval``,
  which SCBench's kv task scores with), input ``'Key: "<uuid>"\\nThe value associated with the specified
  key is: '``, answer the value string (scored as a substring of the prediction).
- ``scbench_prefix_suffix``: context an instruction line and one random string per line; input asks for the
  string that starts with a prefix and ends with a suffix; answer that string (exactly one line matches,
  other lines share the prefix or the suffix alone).
- ``scbench_vt``: RULER-style variable tracking. Context: the instruction, then filler prose with one
  ``VAR A = 12345`` / ``VAR B = VAR A`` chain per turn; input: which variables are assigned a value;
  answer: the list of that chain's variable names (scored by the fraction found).
- ``scbench_mf``: InfiniteBench ``math_find``. Context: one list of integers, written as Python writes a
  list (SCBench's file stores the list itself; its template renders it with ``str``, the same text); each
  turn asks for the largest / second largest / third largest / smallest / second smallest / third smallest
  / median number (``The <x> of the list is: ``, which SCBench's ``r"The .+ is"`` regex turns into the
  question prefix); answer an ``int``.
- ``needle_turns`` / ``add_needles``: the passkey half of ``scbench_summary_with_needles``, inserted into a
  real document; answers are digit strings (SCBench compares them with the first integer of the prediction
  as strings).
- ``kv_block_turns`` / ``add_kv_block``: the kv half of ``scbench_repoqa_and_kv``, a JSON block appended to
  a real code context.
- ``repoqa_stdlib_standin`` (and ``repoqa_and_kv_stdlib_standin``): an offline stand-in for RepoQA on this
  machine's Python standard library, ids ``stdlib-standin-...``; never a substitute for the real
  ``scbench_repoqa`` numbers.

Every row is deterministic given (task, seed, row index, counter); the stand-in's code also depends on the
Python version whose standard library it reads.
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
import sys
import sysconfig
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

CountTokens = Callable[[str], int]
Row = dict
Generator = Callable[..., list[Row]]

KV_PREFIX = "JSON data:\n"
PASSKEY_TASK, SUMMARY_TASK, KV_TASK, REPOQA_TASK = "scbench_passkey", "scbench_summary", "scbench_kv", "scbench_repoqa"
REPOQA_INSTRUCTION = (
    "Based on the function description and code context, please retrieve and repeat the exact "
    "described function from the code context in a code block wrapped by ```:"
)
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object above."
DATA_ONLY_TASKS = ("scbench_qa_eng", "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_summary")


# ----------------------------------------------------------------------------------------------- sizing


def _rng(*parts: object) -> random.Random:
    """A private stream per (task, seed, row, purpose): str seeds hash with SHA-512, so no PYTHONHASHSEED."""
    return random.Random("|".join(map(str, parts)))


def _largest_fitting(render: Callable[[int], str], n_max: int, count_tokens: CountTokens, target: int) -> int:
    """The largest k in [0, n_max] whose render(k) counts at most `target` tokens (binary search; -1 if
    not even k = 0 fits). Only counted sizes are returned, so the result never exceeds the budget."""
    if count_tokens(render(0)) > target:
        return -1
    lo, hi = 0, n_max + 1  # render(lo) fits; render(hi) does not (or is past the pool)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(render(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _fit_items(
    make_item: Callable[[], str],
    render: Callable[[list[str], int], str],
    count_tokens: CountTokens,
    target: int,
    what: str,
) -> tuple[list[str], int]:
    """Draws items (a deterministic stream) until the pool overfills `target`, then the most that fit.

    Returns (pool, k): render(pool, k) is the context. The pool only ever extends the same stream, so the
    first k items do not depend on how large the pool had to grow.
    """
    pool = [make_item() for _ in range(64)]
    per_item = max(1e-3, (count_tokens(render(pool, 64)) - count_tokens(render(pool, 0))) / 64)
    n = int(target / per_item * 1.15) + 16
    while True:
        pool.extend(make_item() for _ in range(n - len(pool)))
        if count_tokens(render(pool, n)) > target:
            break
        n *= 2
    k = _largest_fitting(lambda j: render(pool, j), n, count_tokens, target)
    if k < 0:
        raise ValueError(f"{what}: target_tokens={target} is too small for even the empty context.")
    return pool, k


def _spread_indices(rng: random.Random, n_items: int, n_pick: int, what: str) -> list[int]:
    """n_pick distinct indices in [0, n_items), one per equal stratum (spread over depth), in random order."""
    if n_pick > n_items:
        raise ValueError(
            f"{what}: only {n_items} items fit the target, fewer than the {n_pick} turns asked; "
            f"raise target_tokens or lower n_turns."
        )
    picks = [rng.randrange(i * n_items // n_pick, (i + 1) * n_items // n_pick) for i in range(n_pick)]
    rng.shuffle(picks)
    return picks


def hash_seed(seed: int, index: int) -> int:
    """A row's derived seed (stable across runs and Python processes)."""
    return _rng("derived", seed, index).getrandbits(63)


def _row_id(task: str, seed: int, i: int) -> str:
    return f"{task}-{seed}-{i}"


def _interleave(first: Sequence[dict], second: Sequence[dict]) -> list[dict]:
    out: list[dict] = []
    for i in range(max(len(first), len(second))):
        out.extend(seq[i] for seq in (first, second) if i < len(seq))
    return out


# ------------------------------------------------------------------------------------------------ kv


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_text(pairs: Sequence[str], k: int) -> str:
    return KV_PREFIX + "{" + ", ".join(pairs[:k]) + "}"


def _kv_pair_maker(rng: random.Random) -> Callable[[], str]:
    seen: set[str] = set()

    def make() -> str:
        key = _uuid(rng)
        while key in seen:  # never in practice; keeps keys unique by construction
            key = _uuid(rng)
        seen.add(key)
        return json.dumps(key) + ": " + json.dumps(_uuid(rng))

    return make


def _kv_turns(
    pairs: Sequence[str],
    k: int,
    n_turns: int,
    rng: random.Random,
    what: str,
    instruction: str | None = None,
    task: str | None = None,
) -> list[dict]:
    turns = []
    for j in _spread_indices(rng, k, n_turns, what):
        key, value = json.loads("{" + pairs[j] + "}").popitem()
        text = f"Key: {json.dumps(key)}\nThe value associated with the specified key is: "
        turn = {"input": f"{instruction}\n{text}" if instruction else text, "answer": value}
        if task:
            turn["task"] = task
        turns.append(turn)
    return turns


def make_scbench_kv(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """`scbench_kv` rows: a JSON object of UUID -> UUID pairs; each turn asks the value of one key (keys
    spread over the object's depth); the answer is the value string."""
    rows = []
    for i in range(n_examples):
        pairs, k = _fit_items(
            _kv_pair_maker(_rng("kv", seed, i, "pairs")), _kv_text, count_tokens, target_tokens, "scbench_kv"
        )
        turns = _kv_turns(pairs, k, n_turns, _rng("kv", seed, i, "turns"), "scbench_kv")
        rows.append({"id": _row_id("scbench_kv", seed, i), "context": _kv_text(pairs, k), "multi_turns": turns})
    return rows


# ------------------------------------------------------------------------------------------ prefix_suffix

_ALNUM = string.ascii_letters + string.digits
PREFIX_SUFFIX_HEADER = (
    "Below is a list of random strings, one per line. Memorize them: you will be asked for the "
    "string that starts with a given prefix and ends with a given suffix.\n\n"
)


def _ps_text(strings: Sequence[str], k: int) -> str:
    return PREFIX_SUFFIX_HEADER + "\n".join(strings[:k])


def _ps_matches(strings: Sequence[str], prefix: str, suffix: str) -> list[int]:
    return [j for j, s in enumerate(strings) if s.startswith(prefix) and s.endswith(suffix)]


def make_scbench_prefix_suffix(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """`scbench_prefix_suffix` rows: random alphanumeric strings (16-48 characters), one per line; each turn
    gives a prefix and a suffix (3-6 characters each) and asks for the one string with both; the answer is
    that string. For every target one other line shares its prefix and another its suffix."""
    rows = []
    for i in range(n_examples):
        item_rng = _rng("prefix_suffix", seed, i, "strings")

        def make() -> str:
            return "".join(item_rng.choices(_ALNUM, k=item_rng.randint(16, 48)))

        pool, k = _fit_items(make, _ps_text, count_tokens, target_tokens, "scbench_prefix_suffix")
        strings = list(pool[:k])
        rng = _rng("prefix_suffix", seed, i, "turns")
        if k < 3 * n_turns:
            raise ValueError(
                f"scbench_prefix_suffix: only {k} strings fit target_tokens={target_tokens}; "
                f"{3 * n_turns} are needed for {n_turns} turns."
            )
        for _attempt in range(100):
            strings = list(pool[:k])
            targets = _spread_indices(rng, k, n_turns, "scbench_prefix_suffix")
            target_set = set(targets)
            others = rng.sample([j for j in range(k) if j not in target_set], 2 * n_turns)
            specs = []
            for t, (jp, js) in zip(targets, zip(others[0::2], others[1::2])):
                s = strings[t]
                prefix, suffix = s[: rng.randint(3, 6)], s[-rng.randint(3, 6) :]
                strings[jp] = prefix + strings[jp][len(prefix) :]  # same length: same size in any counter
                strings[js] = strings[js][: -len(suffix)] + suffix
                specs.append((t, prefix, suffix))
            if all(_ps_matches(strings, p, s) == [t] for t, p, s in specs):
                break
        else:  # pragma: no cover - a collision 100 times in a row does not happen
            raise RuntimeError("scbench_prefix_suffix: could not make unique prefix/suffix queries.")
        # The edits keep every string's length; a real tokenizer may still count a few more tokens.
        protected = {t for t, _, _ in specs} | set(others)
        while count_tokens(_ps_text(strings, len(strings))) > target_tokens:
            drop = max(j for j in range(len(strings)) if j not in protected)
            del strings[drop]
            remap = {old: old - (old > drop) for old in protected}
            protected = set(remap.values())
            specs = [(remap[t], p, s) for t, p, s in specs]
        turns = [
            {
                "input": f'Which string in the list above starts with "{p}" and ends with "{s}"? Answer with '
                f"that string only.",
                "answer": strings[t],
            }
            for t, p, s in specs
        ]
        rows.append(
            {
                "id": _row_id("scbench_prefix_suffix", seed, i),
                "context": _ps_text(strings, len(strings)),
                "multi_turns": turns,
            }
        )
    return rows


# -------------------------------------------------------------------------------------------------- vt

_SUBJECTS = (
    "The harbour master",
    "A travelling merchant",
    "The village choir",
    "An old lighthouse",
    "The morning ferry",
    "A stone bridge",
    "The orchard keeper",
    "A narrow alley",
    "The evening market",
    "A weathered signpost",
    "The school library",
    "A mountain stream",
)
_VERBS = (
    "opens before sunrise",
    "was painted last spring",
    "hums a familiar tune",
    "collects rainwater",
    "leans toward the sea",
    "welcomes late visitors",
    "keeps a careful ledger",
    "echoes in the fog",
    "smells of fresh bread",
    "sways in the wind",
)
_TAILS = (
    "on most days.",
    "as everyone expects.",
    "despite the weather.",
    "according to the neighbours.",
    "without much fuss.",
    "every other week.",
    "for no clear reason.",
    "in its own quiet way.",
)
VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def filler_sentence(rng: random.Random) -> str:
    """One sentence of varied filler prose (the style of `lcjax.tasks.passkey`; no digits, no upper-case words)."""
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TAILS)}"


def make_scbench_vt(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5, n_hops: int = 4
) -> list[Row]:
    """`scbench_vt` rows (RULER variable tracking, one chain per turn): ``VAR A = 12345`` then ``VAR B = VAR A``
    ... (n_hops + 1 variables of five capitals) scattered in order through filler prose; each turn asks which
    variables are assigned one chain's value; the answer lists that chain's variables in assignment order."""
    rows = []
    n_vars = n_hops + 1
    for i in range(n_examples):
        rng = _rng("vt", seed, i, "chains")
        names: list[str] = []
        while len(names) < n_turns * n_vars:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names and name != "VAR":
                names.append(name)
        values = rng.sample(range(10000, 100000), n_turns)
        chains = [names[c * n_vars : (c + 1) * n_vars] for c in range(n_turns)]
        statements = []  # (depth fraction, chain, hop, text)
        for c, (chain, value) in enumerate(zip(chains, values)):
            depths = sorted(rng.random() for _ in chain)
            statements.append((depths[0], c, 0, f"VAR {chain[0]} = {value}"))
            statements += [(depths[j], c, j, f"VAR {chain[j]} = VAR {chain[j - 1]}") for j in range(1, n_vars)]
        statements.sort()

        def render(sentences: Sequence[str], k: int) -> str:
            slots: list[list[str]] = [[] for _ in range(k + 1)]
            for depth, _c, _j, text in statements:
                slots[int(depth * (k + 1))].append(text)
            parts = []
            for j in range(k + 1):
                parts.extend(slots[j])
                if j < k:
                    parts.append(sentences[j])
            return VT_HEADER + " ".join(parts)

        filler_rng = _rng("vt", seed, i, "filler")
        pool, k = _fit_items(lambda: filler_sentence(filler_rng), render, count_tokens, target_tokens, "scbench_vt")
        turn_rng = _rng("vt", seed, i, "turns")
        order = list(range(n_turns))
        turn_rng.shuffle(order)
        turns = [
            {
                "input": f"Question: Find all variables that are assigned the value {values[c]} in the text "
                f"above. Answer: According to the chain(s) of variable assignment in the text above, "
                f"{n_vars} variables are assigned the value {values[c]}, they are: ",
                "answer": list(chains[c]),
            }
            for c in order
        ]
        rows.append({"id": _row_id("scbench_vt", seed, i), "context": render(pool, k), "multi_turns": turns})
    return rows


# -------------------------------------------------------------------------------------------------- mf

MF_QUESTIONS = (
    "largest number",
    "second largest number",
    "third largest number",
    "smallest number",
    "second smallest number",
    "third smallest number",
    "median number",
)


def mf_answer(numbers: Sequence[int], question: str) -> int:
    """The answer to one of `MF_QUESTIONS` (k-th largest/smallest over distinct values, as InfiniteBench
    counts them; the median of an odd-length list)."""
    distinct = sorted(set(numbers))
    rank = {
        "largest number": -1,
        "second largest number": -2,
        "third largest number": -3,
        "smallest number": 0,
        "second smallest number": 1,
        "third smallest number": 2,
    }
    if question in rank:
        return distinct[rank[question]]
    if question == "median number":
        if len(numbers) % 2 == 0:
            raise ValueError("mf: the median of an even-length list is not an integer.")
        return sorted(numbers)[len(numbers) // 2]
    raise ValueError(f"mf: unknown question {question!r}; known: {MF_QUESTIONS}")


def _mf_text(numbers: Sequence[str], k: int) -> str:
    return "[" + ", ".join(numbers[:k]) + "]"


def make_scbench_mf(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """`scbench_mf` rows: one list of integers (an odd number of them; values in [lo, hi] with lo in [0, 19]
    and hi in [80, 99], as InfiniteBench's `math_find`); each turn asks a different one of `MF_QUESTIONS`
    (cycling when n_turns > 7); the answer is an int."""
    rows = []
    for i in range(n_examples):
        rng = _rng("mf", seed, i, "numbers")
        lo, hi = rng.randint(0, 19), rng.randint(80, 99)
        pool, k = _fit_items(lambda: str(rng.randint(lo, hi)), _mf_text, count_tokens, target_tokens, "scbench_mf")
        k -= 1 - k % 2  # odd, so the median is a list element
        if k < 7:
            raise ValueError(f"scbench_mf: target_tokens={target_tokens} fits only {k} numbers.")
        numbers = [int(x) for x in pool[:k]]
        turn_rng = _rng("mf", seed, i, "turns")
        questions: list[str] = []
        while len(questions) < n_turns:
            questions += turn_rng.sample(MF_QUESTIONS, len(MF_QUESTIONS))
        turns = [
            {
                "input": f"You should answer with only one number, no other words. The {q} of the list is: ",
                "answer": mf_answer(numbers, q),
            }
            for q in questions[:n_turns]
        ]
        rows.append({"id": _row_id("scbench_mf", seed, i), "context": _mf_text(pool, k), "multi_turns": turns})
    return rows


# --------------------------------------------------------------------------- summary_with_needles: passkeys

_NEEDLE_LABELS = tuple(
    f"{colour} {thing}"
    for thing in ("door", "gate", "chest", "locker", "vault")
    for colour in ("red", "blue", "green", "silver", "golden", "black", "white", "amber")
)


def _needle_positions(context: str, fractions: Sequence[float]) -> list[int]:
    """Insertion offsets near the given depths: after the closest preceding sentence end (within 500
    characters), else before the closest preceding line break or space (within 2000), else the depth itself."""
    positions = []
    for f in fractions:
        at = int(f * len(context))
        pos = at
        for mark, offset, reach in ((". ", 1, 500), ("\n", 0, 2000), (" ", 0, 2000)):
            found = context.rfind(mark, max(0, at - reach), at)
            if found >= 0:
                pos = found + offset
                break
        positions.append(pos)
    return positions


def _insert_needles(context: str, needles: Sequence[str], fractions: Sequence[float]) -> str:
    out = context
    for pos, needle in sorted(zip(_needle_positions(context, fractions), needles), reverse=True):
        out = out[:pos] + " " + needle + out[pos:]  # before the space / line break that follows
    return out


def needle_turns(
    context: str,
    n_needles: int,
    seed: int,
    *,
    count_tokens: CountTokens | None = None,
    target_tokens: int | None = None,
) -> tuple[str, list[dict]]:
    """The passkey part of `scbench_summary_with_needles`: inserts `n_needles` labelled pass keys into a
    (real) document at spread depths and returns (new context, passkey turns tagged ``scbench_passkey``).

    A needle reads "The pass key for the <label> is <5 digits>. Remember it. <digits> is the pass key for the
    <label>."; its turn asks "What is the pass key for the <label>?" and the answer is the digit string. With
    count_tokens and target_tokens, the document's tail is cut (at whitespace) so that the result fits.
    """
    if n_needles > len(_NEEDLE_LABELS):
        raise ValueError(f"needle_turns: at most {len(_NEEDLE_LABELS)} needles.")
    rng = _rng("needles", seed)
    labels = rng.sample(_NEEDLE_LABELS, n_needles)
    keys = [str(k) for k in rng.sample(range(10000, 100000), n_needles)]
    fractions = [(j + rng.uniform(0.1, 0.9)) / n_needles for j in range(n_needles)]
    needles = [
        f"The pass key for the {lab} is {key}. Remember it. {key} is the pass key for the {lab}."
        for lab, key in zip(labels, keys)
    ]

    def render(n_chars: int) -> str:
        cut = context if n_chars >= len(context) else context[: max(0, context.rfind(" ", 0, n_chars))]
        return _insert_needles(cut, needles, fractions)

    if (count_tokens is None) != (target_tokens is None):
        raise ValueError("needle_turns: pass both count_tokens and target_tokens, or neither.")
    if count_tokens is not None and target_tokens is not None:
        n = _largest_fitting(render, len(context), count_tokens, target_tokens)
        if n < 0:
            raise ValueError(f"needle_turns: target_tokens={target_tokens} cannot hold the needles themselves.")
        out = render(n)
    else:
        out = render(len(context))
    order = list(range(n_needles))
    rng.shuffle(order)
    turns = [
        {"input": f"What is the pass key for the {labels[j]}?", "answer": keys[j], "task": PASSKEY_TASK} for j in order
    ]
    return out, turns


def add_needles(
    row: Row, n_needles: int, seed: int, *, count_tokens: CountTokens | None = None, target_tokens: int | None = None
) -> Row:
    """A `scbench_summary_with_needles`-style row from a summary row: needles inserted by `needle_turns`,
    the row's own turns tagged ``scbench_summary`` (unless tagged already) and alternated with the passkey
    turns (summary first)."""
    context, passkeys = needle_turns(
        row["context"], n_needles, seed, count_tokens=count_tokens, target_tokens=target_tokens
    )
    summaries = [dict(t) if "task" in t else dict(t, task=SUMMARY_TASK) for t in row["multi_turns"]]
    return dict(row, context=context, multi_turns=_interleave(summaries, passkeys))


def make_needles_filler_standin(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """An offline stand-in for `scbench_summary_with_needles` holding only its passkey half: `n_turns` needles
    (`needle_turns`) in filler prose instead of a real document, so no summary turns (their gold summaries
    need SCBench's file). Ids ``needles-filler-standin-...``; never a substitute for the real task's numbers."""
    rows = []
    for i in range(n_examples):
        rng = _rng("needles-filler", seed, i)
        filler = " ".join(filler_sentence(rng) for _ in range(max(target_tokens // 4, 16)))
        context, turns = needle_turns(
            filler, n_turns, hash_seed(seed, i), count_tokens=count_tokens, target_tokens=target_tokens
        )
        rows.append({"id": f"needles-filler-standin-{seed}-{i}", "context": context, "multi_turns": turns})
    return rows


# ------------------------------------------------------------------------------- repoqa_and_kv: kv block


def kv_block_turns(
    context: str,
    n_turns: int,
    seed: int,
    *,
    n_pairs: int | None = None,
    count_tokens: CountTokens | None = None,
    target_tokens: int | None = None,
    instruction: bool = True,
) -> tuple[str, list[dict]]:
    """The kv part of `scbench_repoqa_and_kv`: appends ``"\\n\\nJSON data:\\n{...}"`` (UUID pairs) to a
    (real) context and returns (new context, kv turns tagged ``scbench_kv``).

    Size the block by `n_pairs`, or by count_tokens/target_tokens (the whole result at most target_tokens).
    That set's template has no instruction of its own, so each turn's input starts with the kv instruction
    unless instruction=False.
    """
    make = _kv_pair_maker(_rng("kv_block", seed, "pairs"))

    def render(pairs: Sequence[str], k: int) -> str:
        return context + "\n\n" + _kv_text(pairs, k)

    if n_pairs is not None:
        pairs, k = [make() for _ in range(n_pairs)], n_pairs
    elif count_tokens is not None and target_tokens is not None:
        pairs, k = _fit_items(make, render, count_tokens, target_tokens, "kv_block_turns")
    else:
        raise ValueError("kv_block_turns: pass n_pairs, or count_tokens and target_tokens.")
    turns = _kv_turns(
        pairs,
        k,
        n_turns,
        _rng("kv_block", seed, "turns"),
        "kv_block_turns",
        instruction=KV_INSTRUCTION if instruction else None,
        task=KV_TASK,
    )
    return render(pairs, k), turns


def add_kv_block(
    row: Row,
    n_turns: int,
    seed: int,
    *,
    n_pairs: int | None = None,
    count_tokens: CountTokens | None = None,
    target_tokens: int | None = None,
) -> Row:
    """A `scbench_repoqa_and_kv`-style row from a RepoQA row: a kv block appended by `kv_block_turns`, the
    row's own turns tagged ``scbench_repoqa`` (unless tagged already) and alternated with the kv turns."""
    context, kv = kv_block_turns(
        row["context"], n_turns, seed, n_pairs=n_pairs, count_tokens=count_tokens, target_tokens=target_tokens
    )
    repoqa = [dict(t) if "task" in t else dict(t, task=REPOQA_TASK) for t in row["multi_turns"]]
    return dict(row, context=context, multi_turns=_interleave(repoqa, kv))


# ----------------------------------------------------------------------------------- repoqa stand-in

STDLIB_MODULES = (
    "argparse.py",
    "ast.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "genericpath.py",
    "getopt.py",
    "gettext.py",
    "glob.py",
    "heapq.py",
    "hmac.py",
    "inspect.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "linecache.py",
    "locale.py",
    "mailbox.py",
    "netrc.py",
    "numbers.py",
    "optparse.py",
    "pickletools.py",
    "platform.py",
    "plistlib.py",
    "posixpath.py",
    "pprint.py",
    "queue.py",
    "quopri.py",
    "random.py",
    "reprlib.py",
    "sched.py",
    "secrets.py",
    "selectors.py",
    "shlex.py",
    "shutil.py",
    "smtplib.py",
    "socketserver.py",
    "statistics.py",
    "string.py",
    "tabnanny.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "timeit.py",
    "tokenize.py",
    "trace.py",
    "traceback.py",
    "typing.py",
    "uuid.py",
    "wave.py",
    "weakref.py",
    "zipapp.py",
)
STDLIB_REPO = f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"


@lru_cache(maxsize=None)
def _stdlib_files() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(name for name in STDLIB_MODULES if (root / name).is_file()))


@lru_cache(maxsize=None)
def _module_segments(name: str) -> tuple[str, ...]:
    """A stdlib file cut before each top-level statement (decorators and the comments above it go with the
    previous piece), the first piece headed by RepoQA's ``# Path:`` line; any subset, in order, parses."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8").replace("\r\n", "\n")
    if not source.endswith("\n"):
        source += "\n"
    lines = [line + "\n" for line in source[:-1].split("\n")]  # ast's own line breaks (not str.splitlines')
    starts = sorted(
        {0}
        | {min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1 for n in ast.parse(source).body}
    )
    pieces = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]
    pieces[0] = f"# Path: Lib/{name}\n" + pieces[0]
    return tuple(p for p in pieces if p)


def _docstring_purpose(node: ast.AST) -> str:
    doc = ast.get_docstring(node)  # type: ignore[arg-type]
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def _own_nodes(fn: ast.AST) -> list[ast.AST]:
    """The nodes of a function's body, not descending into nested functions, lambdas or classes."""
    out, todo = [], list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))
    return out


def _describe(fn: ast.FunctionDef | ast.AsyncFunctionDef, purpose: str) -> str:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    takes = (
        ("The function takes " + ", ".join(f"`{n}`" for n in names) + ".")
        if names
        else "The function takes no arguments."
    )
    own = _own_nodes(fn)
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own):
        gives = "It is a generator: it yields values."
    elif any(isinstance(n, ast.Return) and n.value is not None for n in own):
        gives = "It returns a value."
    else:
        gives = "It returns None."
    return f"Function Description:\n1. **Purpose**: {purpose}\n2. **Input**: {takes}\n3. **Output**: {gives}"


def _stdlib_context(rng: random.Random, budget: int, count_tokens: CountTokens, cache: dict[str, int]) -> str:
    """Whole top-level statements of stdlib files (in a seeded order of the sorted file list), greedily
    skipping pieces too large for what is left, then trimmed until the counted total fits."""
    files = list(_stdlib_files())
    rng.shuffle(files)
    chosen: list[str] = []
    used, skipped = 0, 0
    for name in files:
        for n, piece in enumerate(_module_segments(name)):
            if piece not in cache:
                cache[piece] = count_tokens(piece)
            if used + cache[piece] <= budget:
                chosen.append(piece)
                used += cache[piece]
                skipped = 0
            else:
                skipped += 1
                if n == 0:  # no code under another file's "# Path:" line: skip the whole file
                    break
            if used >= 0.97 * budget or skipped > 200:
                break
        if used >= 0.97 * budget or skipped > 200:
            break
    while chosen and count_tokens("".join(chosen)) > budget:
        chosen.pop()
    return "".join(chosen)


def _repoqa_turns(context: str, n_turns: int, rng: random.Random, instruction: bool) -> list[dict]:
    tree = ast.parse(context)
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    purposes = [_docstring_purpose(f) for f in fns]
    candidates = []
    for j, (fn, purpose) in enumerate(zip(fns, purposes)):
        if len(purpose.split()) < 4:
            continue
        description = _describe(fn, purpose)
        if re.search(rf"\b{re.escape(fn.name)}\b", description, re.IGNORECASE):  # the name stays withheld
            continue
        # Exactly one function's docstring summary may occur in the description: its own.
        if any(p and p in description for q, p in enumerate(purposes) if q != j):
            continue
        candidates.append((fn.lineno, j, description))
    candidates.sort()
    picks = _spread_indices(rng, len(candidates), n_turns, "repoqa_stdlib_standin (functions with docstrings)")
    turns = []
    for c in picks:
        _, j, description = candidates[c]
        source = ast.get_source_segment(context, fns[j])
        assert source is not None
        turns.append(
            {
                "input": f"{REPOQA_INSTRUCTION}\n\n{description}" if instruction else description,
                "answer": source,
                "name": fns[j].name,
            }
        )
    return turns


def _stdlib_rows_parts(
    rng: random.Random,
    budget: int,
    count_tokens: CountTokens,
    cache: dict[str, int],
    n_turns: int,
    instruction: bool,
    attempts: int = 8,
) -> tuple[str, list[dict]]:
    """A stdlib context and its RepoQA turns; a small budget may hold too few described functions, so up to
    `attempts` seeded file orders are tried before giving up."""
    for attempt in range(attempts):
        context = _stdlib_context(rng, budget, count_tokens, cache)
        try:
            return context, _repoqa_turns(context, n_turns, rng, instruction)
        except ValueError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def make_repoqa_stdlib_standin(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """Offline stand-in for `scbench_repoqa` (ids ``stdlib-standin-...``): the context is real Python source
    from this machine's standard library (``# Path: Lib/<file>`` then whole top-level statements); each turn
    describes a function from its docstring (name withheld) and asks for it; the answer is that function's
    exact source, and the turn carries its ``name``; rows carry ``lang`` and ``repo`` as SCBench's do."""
    rows = []
    cache: dict[str, int] = {}
    for i in range(n_examples):
        context, turns = _stdlib_rows_parts(
            _rng("repoqa", seed, i), target_tokens, count_tokens, cache, n_turns, instruction=False
        )
        rows.append(
            {
                "id": f"stdlib-standin-{seed}-{i}",
                "context": context,
                "multi_turns": turns,
                "lang": "python",
                "repo": STDLIB_REPO,
            }
        )
    return rows


def make_repoqa_and_kv_stdlib_standin(
    n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5, code_share: float = 0.6
) -> list[Row]:
    """Offline stand-in for `scbench_repoqa_and_kv` (ids ``stdlib-standin-kv-...``): a stdlib code context of
    about `code_share` of the budget, then a kv block filling the rest; ceil(n_turns/2) RepoQA turns alternate
    with floor(n_turns/2) kv turns, each tagged with its sub-task and carrying its own instruction."""
    rows = []
    cache: dict[str, int] = {}
    for i in range(n_examples):
        n_repo = (n_turns + 1) // 2
        code, turns = _stdlib_rows_parts(
            _rng("repoqa_kv", seed, i), int(target_tokens * code_share), count_tokens, cache, n_repo, instruction=True
        )
        repo_turns = [dict(t, task=REPOQA_TASK) for t in turns]
        context, kv = kv_block_turns(
            code, n_turns - n_repo, hash_seed(seed, i), count_tokens=count_tokens, target_tokens=target_tokens
        )
        rows.append(
            {
                "id": f"stdlib-standin-kv-{seed}-{i}",
                "context": context,
                "multi_turns": _interleave(repo_turns, kv),
                "lang": "python",
                "repo": STDLIB_REPO,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- registry

GENERATORS: dict[str, Generator] = {
    "scbench_kv": make_scbench_kv,
    "scbench_prefix_suffix": make_scbench_prefix_suffix,
    "scbench_vt": make_scbench_vt,
    "scbench_mf": make_scbench_mf,
    # the passkey half only, in filler text (ids needles-filler-standin-...): SCBench's file replaces it
    "scbench_summary_with_needles": make_needles_filler_standin,
    "repoqa_stdlib_standin": make_repoqa_stdlib_standin,
    "repoqa_and_kv_stdlib_standin": make_repoqa_and_kv_stdlib_standin,
}


GENERATED_SUB_TASKS: dict[str, str] = {"scbench_summary_with_needles": "scbench_passkey"}
"""The sub-task every generated turn has, for generators whose turns are one sub-task of a multi-task set."""


def generate(
    task: str, n_examples: int, target_tokens: int, count_tokens: CountTokens, seed: int, n_turns: int = 5
) -> list[Row]:
    """Rows of `task` from its generator; a task without one raises ValueError saying what it needs."""
    if task in GENERATORS:
        return GENERATORS[task](n_examples, target_tokens, count_tokens, seed, n_turns)
    raise ValueError(
        f"No generator for {task!r}. Generated here: {', '.join(GENERATORS)}. "
        f"{', '.join(DATA_ONLY_TASKS)} need SCBench's original data files, one per task at "
        f"<data_dir>/<task>.jsonl (e.g. <data_dir>/scbench_qa_eng.jsonl), as SCBench's own files (the hub "
        f"dataset microsoft/SCBench, data/<task>.jsonl). scbench_repoqa needs its file as well "
        f"(repoqa_stdlib_standin is only an offline stand-in); scbench_summary_with_needles and "
        f"scbench_repoqa_and_kv need their files, or a summary / repoqa row plus add_needles() / add_kv_block() "
        f"for the synthetic half."
    )
