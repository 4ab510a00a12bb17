"""SCBench (shared-context, multi-turn and multi-request) over lcjax's long-context methods:
`python -m experiments.scbench` (installed: `lcjax-scbench`).

With no flags: the built-in SmolLM2-135M on CPU, two synthetic tasks (passkey needles, variable tracing) at 3K
tokens, dense against StreamingLLM, SnapKV and Quest with SCBench's own budgets (which cover most of a 3K input;
`make demo` adds `--kv_budget 512`), in both modes, with the model's chat template (as SCBench's published
scripts run); about ten minutes on two cores. SCBench's own flags work (`--task`, `--attn_type`, `--kv_type`,
`--hyper_param`, `--max_seq_length`, `--max_turns`, `--num_eval_examples`, `--output_dir`, `--data_dir`,
`--use_chat_template`, `--disable_golden_context`), with comma lists for tasks, modes
and methods (or `--methods a_shape,snapkv,minference+quest`) so one run fills a comparison table. Every
finished example is appended to `<output_dir>/results.jsonl` at once; a rerun skips what is done (and refuses
an output directory made with other settings). At the end: `scores.md`, `scores.csv`, `score_by_turn.png`
and `score_by_method.png` in the output directory, scored as `--scoring` says (default: as SCBench's
`compute_scores.py` scores).
"""

from __future__ import annotations

import argparse
import json
import time

from tqdm import tqdm

import lcjax
from lcjax.methods import (
    ATTENTION_METHODS,
    BUDGET_FIELDS,
    CACHE_METHODS,
    attention_method,
    cache_method,
    check_attention_fields,
)
from lcjax.scbench import prompts
from lcjax.scbench.data import TASKS, MissingDataError, load_task
from lcjax.scbench.generators import GENERATED_SUB_TASKS
from lcjax.scbench.report import SCORINGS, plot_by_method, plot_by_turn, write_tables
from lcjax.scbench.results import ResultLog
from lcjax.scbench.runner import MODES, run_example, token_pieces
from lcjax.scbench.scoring import repoqa_needles


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        "--model_name_or_path",
        default=lcjax.DEFAULT_MODEL,
        help="built-in name, transformers checkpoint directory, or .gguf file",
    )
    p.add_argument("--task", default="scbench_summary_with_needles,scbench_vt", help="comma list of SCBench tasks")
    p.add_argument("--mode", default=",".join(MODES), help="multi-turn, multi-request, or both")
    p.add_argument(
        "--same_context_different_query",
        "--same-context-different-query",
        action="store_true",
        help="SCBench's flag for multi-request mode alone",
    )
    p.add_argument(
        "--attn_type",
        "--attn-type",
        default="dense",
        help="comma list: dense, a_shape, tri_shape, "
        "minference, vertical_slash, block_sparse (SCBench's vllm / vllm_<name> spellings too)",
    )
    p.add_argument(
        "--kv_type",
        "--kv-type",
        default="dense,streamingllm,snapkv,quest",
        help=f"comma list: {', '.join(CACHE_METHODS)}",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of methods instead of the --attn_type x --kv_type grid: each an attention "
        "method (dense cache), a cache method (dense attention) or attn+kv, e.g. "
        "dense,a_shape,minference,snapkv,minference+snapkv",
    )
    p.add_argument(
        "--kv_budget",
        "--kv-budget",
        type=int,
        default=None,
        help="tokens every cache method keeps or reads (presses' capacity, Quest's token_budget, "
        "RetrievalAttention's top_k); default: each method's SCBench default (presses 4096, Quest 1024, "
        "retr_attn 2000)",
    )
    p.add_argument(
        "--scoring",
        default="original",
        choices=SCORINGS,
        help="original: compute_scores.py's numbers exactly (its per-character and per-turn quirks); fixed: "
        "lcjax's scorers, every turn pooled (docs/scbench.md lists the differences)",
    )
    p.add_argument(
        "--disable_golden_context",
        "--disable-golden-context",
        action="store_true",
        help="multi-turn: the model's own answers stay in the cache instead of the gold ones",
    )
    p.add_argument(
        "--hyper_param",
        "--hyper-param",
        type=json.loads,
        default={},
        help='JSON: {"<method>": {hyperparameters}} (a method is an attn_type or kv_type name)',
    )
    p.add_argument("--max_seq_length", "--max-seq-length", type=int, default=3072)
    p.add_argument("--max_turns", "--max-turns", type=int, default=5)
    p.add_argument("--num_eval_examples", "--num-eval-examples", type=int, default=1)
    p.add_argument(
        "--max_new_tokens_cap",
        "--max-new-tokens-cap",
        type=int,
        default=None,
        help="a ceiling on every turn's generation budget (quick runs)",
    )
    p.add_argument("--output_dir", "--output-dir", default="results/scbench")
    p.add_argument("--data_dir", "--data-dir", default=None, help="SCBench's <task>.jsonl files")
    p.add_argument(
        "--standins",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="without their files, scbench_repoqa and scbench_repoqa_and_kv run on offline stand-ins "
        "built from the Python standard library (labelled '(stand-in)' in the tables)",
    )
    p.add_argument("--from_hub", "--from-hub", action="store_true", help="read microsoft/SCBench from the hub")
    p.add_argument(
        "--use_chat_template",
        "--use-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the tokenizer's chat template around every prompt, as SCBench's published "
        "scripts run (default: on when the tokenizer has one)",
    )
    p.add_argument(
        "--layer_layout",
        "--layer-layout",
        default="stacked",
        choices=("stacked", "unstacked", "auto"),
        help="stacked (one scan over layers) compiles fast: a run compiles per method and shape and "
        "decodes only tens of tokens per turn; unstacked decodes faster on GPU but compiles per layer",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.modes = ["multi-request"] if a.same_context_different_query else a.mode.split(",")
    a.tasks = a.task.split(",")
    try:
        a.method_pairs = method_pairs(a)
        check_flags(a)
    except ValueError as e:
        p.error(str(e))
    return a


def check_flags(a) -> None:
    """Everything the flags alone decide, checked before any data or model loads: names, counts, every
    method's hyperparameters and budget (by building its cache transform)."""
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        raise ValueError(f"--mode: unknown mode(s) {bad}; choose from {', '.join(MODES)}.")
    unknown = [t for t in a.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--task: unknown task(s) {', '.join(unknown)}; SCBench's tasks: {', '.join(TASKS)}.")
    for flag, value, least in (("--max_turns", a.max_turns, 1), ("--max_seq_length", a.max_seq_length, 1),
                               ("--kv_budget", a.kv_budget, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}.")
    if a.num_eval_examples < 1 and a.num_eval_examples != -1:
        raise ValueError(f"--num_eval_examples must be >= 1 (or -1: every example), got {a.num_eval_examples}.")
    if not isinstance(a.hyper_param, dict) or not all(isinstance(v, dict) for v in a.hyper_param.values()):
        raise ValueError('--hyper_param takes a JSON object of objects, e.g. {"snapkv": {"window_size": 16}}.')
    in_run = {name for pair in a.method_pairs for name in pair}
    stray = sorted(set(a.hyper_param) - in_run)
    if stray:
        raise ValueError(f"--hyper_param names {', '.join(stray)}, which this run does not use; its methods: "
                         f"{', '.join(sorted(in_run))}.")  # fmt: skip
    for attn, kv in a.method_pairs:
        try:
            check_attention_fields(attn, a.hyper_param.get(attn, {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--hyper_param: {e}") from None
        try:
            cache_method(kv, budget=a.kv_budget, **a.hyper_param.get(kv, {}))
        except (TypeError, ValueError) as e:
            budget = "" if a.kv_budget is None else f" (with --kv_budget {a.kv_budget})"
            where = f"--hyper_param for {kv}{budget}" if kv in a.hyper_param else f"--kv_budget {a.kv_budget} for {kv}"
            raise ValueError(f"{where}: {e}") from None


def _attn_name(name: str) -> str:
    """SCBench's vLLM spellings (`vllm` = dense, `vllm_minference`, `vllm_a_shape`, ...) name the same methods."""
    return "dense" if name == "vllm" else name.removeprefix("vllm_")


def method_pairs(a) -> list[tuple[str, str]]:
    """(attn_type, kv_type) pairs to run: the --methods list, else every --attn_type with every --kv_type."""

    def unknown(name: str) -> ValueError:
        return ValueError(
            f"unknown method {name!r}; attention: {', '.join(ATTENTION_METHODS)}; cache: "
            f"{', '.join(CACHE_METHODS)}; or attn+kv."
        )

    if a.methods is None:
        pairs = [(_attn_name(at), kv) for at in a.attn_type.split(",") for kv in a.kv_type.split(",")]
    else:
        pairs = []
        for name in a.methods.split(","):
            if "+" in name:
                attn, kv = name.split("+", 1)
                pairs.append((_attn_name(attn), kv))
            elif _attn_name(name) in ATTENTION_METHODS:
                pairs.append((_attn_name(name), "dense"))
            elif name in CACHE_METHODS:
                pairs.append(("dense", name))
            else:
                raise unknown(name)
    for attn, kv in pairs:
        if attn not in ATTENTION_METHODS or kv not in CACHE_METHODS:
            raise unknown(f"{attn}+{kv}")
    return list(dict.fromkeys(pairs))


SETTINGS = (
    "model",
    "dtype",
    "max_seq_length",
    "max_turns",
    "use_chat_template",
    "kv_budget",
    "hyper_param",
    "disable_golden_context",
    "max_new_tokens_cap",
    "seed",
    "data_dir",
)
"""Flags that change a result: a resumed run must match the rows already in its output directory on all."""


def run_settings(a) -> dict:
    return {
        k: (str(getattr(a, k)) if k in ("model", "data_dir") and getattr(a, k) is not None else getattr(a, k))
        for k in SETTINGS
    }


def check_settings(rows: list[dict], settings: dict, path, unknown: tuple[str, ...] = ()) -> None:
    """Refuses to resume into results made with other settings (they would be mixed in one table); settings
    named in `unknown` (not decided yet) are left out."""
    for row in rows:
        old = row.get("settings", {})
        differ = {k: (old.get(k), v) for k, v in settings.items() if k not in unknown and old.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: {o!r} there, {n!r} now" for k, (o, n) in differ.items())
            raise SystemExit(
                f"{path} holds results made with other settings ({detail}); pass another "
                f"--output_dir or the same flags."
            )


def note_whole_budgets(a) -> None:
    """Says which cache methods keep or read at least the whole input (--max_seq_length): they equal dense there
    (SCBench's defaults are sized for 100K+ contexts)."""
    for kv in dict.fromkeys(kv for _, kv in a.method_pairs):
        if kv not in BUDGET_FIELDS:
            continue
        kept = getattr(cache_method(kv, budget=a.kv_budget, **a.hyper_param.get(kv, {})), BUDGET_FIELDS[kv])
        if kept is not None and kept >= a.max_seq_length:
            print(f"note: {kv} keeps {kept} tokens, at least --max_seq_length {a.max_seq_length}: it equals dense "
                  "here; a smaller --kv_budget makes it compress")  # fmt: skip


def build_method(model, attn: str, kv: str, a):
    """The model with SCBench's `attn`/`kv` methods, their defaults, --kv_budget and --hyper_param applied."""
    attention = None
    if attn != "dense" or attn in a.hyper_param:
        attention = attention_method(attn, model.config, **a.hyper_param.get(attn, {}))
    cache_transform = cache_method(kv, budget=a.kv_budget, **a.hyper_param.get(kv, {})) or "dense"
    return model.with_transforms(attention=attention, cache_transform=cache_transform)


def _fits(task: str, a, tok, count, max_seq_length: int):
    """(rows, source) of `task` at `max_seq_length` when every example's first prompt fits what SCBench leaves it
    (`prompts.max_input_length`) in every mode, else None. Generated contexts are sized to fit every mode uncut (a
    middle cut could drop answers; the 200-token margin covers the query and chat-template text); files are read
    as they are and cut as SCBench cuts them, which needs room left for them."""
    sub_tasks = [GENERATED_SUB_TASKS[task]] * a.max_turns if task in GENERATED_SUB_TASKS else None
    rooms = {m: prompts.max_input_length(task, max_seq_length, a.max_turns, m, sub_tasks) for m in a.modes}
    if min(rooms.values()) <= 0:
        return None
    try:
        rows, source = load_task(
            task,
            a.data_dir,
            count_tokens=count,
            target_tokens=max(min(rooms.values()) - 200, 256),
            num_examples=a.num_eval_examples,
            seed=a.seed,
            max_turns=a.max_turns,
            from_hub=a.from_hub,
            standins=a.standins,
        )
    except ValueError:  # a generator that cannot fit the turns asked into this length
        return None
    if source.startswith(("file", "hub")):
        return rows, source
    for row in rows:
        for mode, room in rooms.items():
            shared, turn_ids, _ = token_pieces(tok, task, row, mode, use_chat_template=a.use_chat_template)
            if len(shared if shared is not None else turn_ids[0]) > room:
                return None
    return rows, source


def smallest_passing(passes, start: int, limit: int = 1 << 21) -> int | None:
    """The smallest n >= start with passes(n), assuming that passing is monotone in n (None past `limit`)."""
    lo, hi = start, start
    while not passes(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > 1:  # passes(hi), and nothing at or below lo passed
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def load_work(a, tok) -> list[tuple]:
    """(task, example, attention, cache, mode) for every run asked, each task checked to fit --max_seq_length
    with its --max_turns before the model loads."""
    count = lambda text: len(tok.encode(text, add_special_tokens=False))
    work = []
    for task in a.tasks:
        try:
            found = _fits(task, a, tok, count, a.max_seq_length)
        except MissingDataError as e:  # before any run starts: nothing is lost
            raise SystemExit(f"{e}\n(or leave {task} out of --task)") from None
        if found is None:
            least = smallest_passing(lambda n: _fits(task, a, tok, count, n) is not None, a.max_seq_length + 1)
            need = "no length up to 2M tokens fits" if least is None else f"the least that fits is {least}"
            raise SystemExit(
                f"{task} does not fit --max_seq_length {a.max_seq_length} with --max_turns {a.max_turns} "
                f"(its context and every turn's answer budget must fit, in modes {', '.join(a.modes)}): {need}; "
                f"raise --max_seq_length or lower --max_turns."
            )
        rows, source = found
        print(f"{task}: {len(rows)} example(s) from {source}")
        work += [(task, row, attn, kv, mode) for row in rows for attn, kv in a.method_pairs for mode in a.modes]
    return work


def main(argv=None) -> None:
    a = parse_args(argv)
    log = ResultLog(f"{a.output_dir}/results.jsonl", ("task", "method", "mode", "id"))
    try:
        run(a, log)
    except KeyboardInterrupt:
        raise SystemExit(
            f"\ninterrupted: {len(log.rows)} runs are saved in {log.path}; the same command resumes from there."
        ) from None


def run(a, log: ResultLog) -> None:
    """The job after its flags are parsed: settings, data and fit checks, the model, every run not yet in `log`,
    then the tables and plots."""
    # before the model loads (minutes for a large one); whether prompts use the chat template may wait for
    # the tokenizer
    deferred = ("use_chat_template",) if a.use_chat_template is None else ()
    check_settings(log.rows, run_settings(a), log.path, unknown=deferred)
    tok = lcjax.load_tokenizer(a.model)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; SCBench needs one.")
    if a.use_chat_template is None:
        a.use_chat_template = tok.chat_template is not None
    elif a.use_chat_template and tok.chat_template is None:
        raise SystemExit(f"--use_chat_template: {a.model}'s tokenizer has no chat template.")
    print(f"prompts: {'the chat template' if a.use_chat_template else 'plain SCBench templates'}")
    settings = run_settings(a)
    if deferred:
        check_settings(log.rows, settings, log.path)
    work = load_work(a, tok)
    todo = [w for w in work if {"task": w[0], "method": f"{w[2]}+{w[3]}", "mode": w[4], "id": w[1]["id"]} not in log]
    print(f"{len(work)} (example, method, mode) runs, {len(work) - len(todo)} already in {log.path}")
    evaluated = {}  # repoqa's candidates: the functions of every evaluated row of the same repository
    for task, row, *_ in work:
        evaluated.setdefault(task, {})[row["id"]] = row
    needles = {task: repoqa_needles(rows.values()) for task, rows in evaluated.items() if "repoqa" in task}
    note_whole_budgets(a)
    model, tok = lcjax.load_model(a.model, dtype=a.dtype, layer_layout=a.layer_layout)
    built = {}
    for task, row, attn, kv, mode in tqdm(todo, desc="scbench", unit="run"):
        if (attn, kv) not in built:
            built[attn, kv] = build_method(model, attn, kv, a)
        t0 = time.perf_counter()
        turns = run_example(
            built[attn, kv],
            tok,
            task,
            row,
            mode,
            max_new_tokens_cap=a.max_new_tokens_cap,
            max_seq_length=a.max_seq_length,
            use_chat_template=a.use_chat_template,
            disable_golden_context=a.disable_golden_context,
            needles=needles.get(task),
        )
        log.append(
            {
                "task": task,
                "method": f"{attn}+{kv}",
                "mode": mode,
                "id": row["id"],
                "model": str(a.model),
                "settings": settings,
                "seconds": time.perf_counter() - t0,
                "turns": [t.__dict__ for t in turns],
            }
        )
    md, csv_path = write_tables(log.rows, a.output_dir, a.scoring)
    png = plot_by_turn(log.rows, f"{a.output_dir}/score_by_turn.png", a.scoring)
    bars = plot_by_method(log.rows, f"{a.output_dir}/score_by_method.png", a.scoring)
    print("\n" + md.read_text())
    print(f"wrote {md}, {csv_path}, {png}, {bars}")


if __name__ == "__main__":
    main()
