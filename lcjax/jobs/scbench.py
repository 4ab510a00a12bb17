"""SCBench (shared-context, multi-turn and multi-request) over lcjax's long-context methods:
`python -m experiments.scbench` (installed: `lcjax-scbench`).

With no flags: the built-in SmolLM2-135M on CPU, two synthetic tasks (passkey needles, variable tracing) at 3K
tokens, dense against StreamingLLM, SnapKV and Quest keeping 512 tokens, in both modes, with the model's chat
template (as SCBench's published scripts run); about six minutes on two cores. SCBench's own flags work
(`--task`, `--attn_type`, `--kv_type`, `--hyper_param`, `--max_seq_length`, `--max_turns`,
`--num_eval_examples`, `--output_dir`, `--data_dir`, `--use_chat_template`), with comma lists for tasks, modes
and methods (or `--methods a_shape,snapkv,minference+quest`) so one run fills a comparison table. Every
finished example is appended to `<output_dir>/results.jsonl` at once; a rerun skips what is done (and refuses
an output directory made with other settings). At the end: `scores.md`, `scores.csv`, `score_by_turn.png`
and `score_by_method.png` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import time

from tqdm import tqdm

import lcjax
from lcjax.methods import ATTENTION_METHODS, CACHE_METHODS, attention_method, cache_method
from lcjax.scbench import prompts
from lcjax.scbench.data import MissingDataError, load_task
from lcjax.scbench.generators import GENERATED_SUB_TASKS
from lcjax.scbench.report import plot_by_method, plot_by_turn, write_tables
from lcjax.scbench.results import ResultLog
from lcjax.scbench.runner import MODES, run_example


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
        help="comma list: dense, streamingllm, snapkv, pyramidkv, kivi, quest",
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
        default=512,
        help="tokens a cache method keeps (presses' capacity, Quest's token_budget); SCBench: 4096 "
        "of 128K; the default is a sixth of the default 3K context",
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
    try:
        a.method_pairs = method_pairs(a)
    except ValueError as e:
        p.error(str(e))
    a.modes = ["multi-request"] if a.same_context_different_query else a.mode.split(",")
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return a


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


def build_method(model, attn: str, kv: str, a):
    """The model with SCBench's `attn`/`kv` methods, their defaults, --kv_budget and --hyper_param applied."""
    attention = None
    if attn != "dense" or attn in a.hyper_param:
        attention = attention_method(attn, model.config, **a.hyper_param.get(attn, {}))
    cache_transform = cache_method(kv, budget=a.kv_budget, **a.hyper_param.get(kv, {})) or "dense"
    return model.with_transforms(attention=attention, cache_transform=cache_transform)


def main(argv=None) -> None:
    a = parse_args(argv)
    log = ResultLog(f"{a.output_dir}/results.jsonl", ("task", "method", "mode", "id"))
    # before the model loads (minutes for a large one); whether prompts use the chat template may wait for
    # the tokenizer
    deferred = ("use_chat_template",) if a.use_chat_template is None else ()
    check_settings(log.rows, run_settings(a), log.path, unknown=deferred)
    model, tok = lcjax.load_model(a.model, dtype=a.dtype, layer_layout=a.layer_layout)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; SCBench needs one.")
    if a.use_chat_template is None:
        a.use_chat_template = tok.chat_template is not None
    elif a.use_chat_template and tok.chat_template is None:
        raise SystemExit(f"--use_chat_template: {a.model}'s tokenizer has no chat template.")
    print(f"prompts: {'the chat template' if a.use_chat_template else 'plain SCBench templates'}")
    count = lambda text: len(tok.encode(text, add_special_tokens=False))
    methods = a.method_pairs
    settings = run_settings(a)
    if deferred:
        check_settings(log.rows, settings, log.path)
    work = []
    for task in a.task.split(","):
        # generated contexts are sized to fit every requested mode uncut (a middle cut could drop answers);
        # the margin covers the query and chat-template text. Files from --data_dir are read as they are.
        sub_tasks = [GENERATED_SUB_TASKS[task]] * a.max_turns if task in GENERATED_SUB_TASKS else None
        target = min(prompts.max_input_length(task, a.max_seq_length, a.max_turns, m, sub_tasks) for m in a.modes) - 200
        try:
            rows, source = load_task(
                task,
                a.data_dir,
                count_tokens=count,
                target_tokens=max(target, 256),
                num_examples=a.num_eval_examples,
                seed=a.seed,
                max_turns=a.max_turns,
                from_hub=a.from_hub,
                standins=a.standins,
            )
        except MissingDataError as e:  # before any run starts: nothing is lost
            raise SystemExit(f"{e}\n(or leave {task} out of --task)") from None
        print(f"{task}: {len(rows)} example(s) from {source}")
        work += [(task, row, attn, kv, mode) for row in rows for attn, kv in methods for mode in a.modes]
    todo = [w for w in work if {"task": w[0], "method": f"{w[2]}+{w[3]}", "mode": w[4], "id": w[1]["id"]} not in log]
    print(f"{len(work)} (example, method, mode) runs, {len(work) - len(todo)} already in {log.path}")
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
    md, csv_path = write_tables(log.rows, a.output_dir)
    png = plot_by_turn(log.rows, f"{a.output_dir}/score_by_turn.png")
    bars = plot_by_method(log.rows, f"{a.output_dir}/score_by_method.png")
    print("\n" + md.read_text())
    print(f"wrote {md}, {csv_path}, {png}, {bars}")


if __name__ == "__main__":
    main()
