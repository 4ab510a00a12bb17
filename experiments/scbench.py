"""SCBench (shared-context, multi-turn and multi-request) over lcjax's long-context methods:
`python -m experiments.scbench`.

With no flags: the built-in SmolLM2-135M on CPU, three synthetic tasks (kv, vt, mf) at 2K tokens, dense
against StreamingLLM, SnapKV and Quest keeping 256 tokens, in both modes; a few minutes. SCBench's own flags
work (`--task`, `--attn_type`, `--kv_type`, `--hyper_param`, `--max_seq_length`, `--max_turns`,
`--num_eval_examples`, `--output_dir`, `--data_dir`, `--use_chat_template`), with comma lists for tasks,
modes and methods so one run fills a comparison table. Every finished example is appended to
`<output_dir>/results.jsonl` at once; a rerun skips what is done. At the end: `scores.md`, `scores.csv` and
`score_by_turn.png` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import time

import lcjax
from lcjax.methods import attention_method, cache_method
from lcjax.scbench import prompts
from lcjax.scbench.data import load_task
from lcjax.scbench.report import plot_by_turn, write_tables
from lcjax.scbench.results import ResultLog
from lcjax.scbench.runner import MODES, run_example

PRESSES = ("streamingllm", "snapkv", "pyramidkv")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model_name_or_path", default=lcjax.DEFAULT_MODEL,
                   help="built-in name, transformers checkpoint directory, or .gguf file")
    p.add_argument("--task", default="scbench_kv,scbench_vt,scbench_mf", help="comma list of SCBench tasks")
    p.add_argument("--mode", default=",".join(MODES), help="multi-turn, multi-request, or both")
    p.add_argument("--same_context_different_query", "--same-context-different-query", action="store_true",
                   help="SCBench's flag for multi-request mode alone")
    p.add_argument("--attn_type", "--attn-type", default="dense", help="comma list: dense, a_shape, tri_shape, "
                   "minference, vertical_slash, block_sparse")
    p.add_argument("--kv_type", "--kv-type", default="dense,streamingllm,snapkv,quest",
                   help="comma list: dense, streamingllm, snapkv, pyramidkv, kivi, quest")
    p.add_argument("--kv_budget", "--kv-budget", type=int, default=256,
                   help="tokens a cache method keeps (presses' capacity, Quest's token_budget); SCBench: 4096")
    p.add_argument("--hyper_param", "--hyper-param", type=json.loads, default={},
                   help='JSON: {"<method>": {hyperparameters}} (a method is an attn_type or kv_type name)')
    p.add_argument("--max_seq_length", "--max-seq-length", type=int, default=2048)
    p.add_argument("--max_turns", "--max-turns", type=int, default=5)
    p.add_argument("--num_eval_examples", "--num-eval-examples", type=int, default=1)
    p.add_argument("--max_new_tokens_cap", "--max-new-tokens-cap", type=int, default=None,
                   help="a ceiling on every turn's generation budget (quick runs)")
    p.add_argument("--output_dir", "--output-dir", default="results/scbench")
    p.add_argument("--data_dir", "--data-dir", default=None, help="SCBench's <task>.jsonl files")
    p.add_argument("--from_hub", "--from-hub", action="store_true", help="read microsoft/SCBench from the hub")
    p.add_argument("--use_chat_template", "--use-chat-template", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.use_chat_template:
        p.error("--use_chat_template is not supported by this runner yet (plain SCBench templates are).")
    a.modes = ["multi-request"] if a.same_context_different_query else a.mode.split(",")
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return a


def build_method(model, attn: str, kv: str, a):
    """The model with SCBench's `attn`/`kv` methods, their defaults, --kv_budget and --hyper_param applied."""
    attention = None
    if attn != "dense" or attn in a.hyper_param:
        attention = attention_method(attn, model.config, **a.hyper_param.get(attn, {}))
    kw = {}
    if kv in PRESSES:
        kw["capacity"] = a.kv_budget
        if kv == "streamingllm":
            kw["n_sink"] = min(128, a.kv_budget // 4)
    elif kv == "quest":
        kw["token_budget"] = a.kv_budget
    cache = cache_method(kv, **{**kw, **a.hyper_param.get(kv, {})}) or "dense"
    return model.with_transforms(attention=attention, cache=cache)


def main(argv=None) -> None:
    a = parse_args(argv)
    from tqdm import tqdm
    model, tok = lcjax.load_model(a.model, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; SCBench needs one.")
    count = lambda text: len(tok.encode(text, add_special_tokens=False))
    methods = [(at, kv) for at in a.attn_type.split(",") for kv in a.kv_type.split(",")]
    log = ResultLog(f"{a.output_dir}/results.jsonl", ("task", "method", "mode", "id"))
    work = []
    for task in a.task.split(","):
        target = prompts.max_input_length(task, a.max_seq_length, a.max_turns) - 200
        rows, source = load_task(task, a.data_dir, count_tokens=count, target_tokens=max(target, 256),
                                 num_examples=a.num_eval_examples, seed=a.seed, max_turns=a.max_turns,
                                 from_hub=a.from_hub)
        print(f"{task}: {len(rows)} example(s) from {source}")
        work += [(task, row, attn, kv, mode) for row in rows for attn, kv in methods for mode in a.modes]
    todo = [w for w in work if {"task": w[0], "method": f"{w[2]}+{w[3]}", "mode": w[4], "id": w[1]["id"]}
            not in log]
    print(f"{len(work)} (example, method, mode) runs, {len(work) - len(todo)} already in {log.path}")
    built = {}
    for task, row, attn, kv, mode in tqdm(todo, desc="scbench", unit="run"):
        if (attn, kv) not in built:
            built[attn, kv] = build_method(model, attn, kv, a)
        t0 = time.perf_counter()
        turns = run_example(built[attn, kv], tok, task, row, mode, max_new_tokens_cap=a.max_new_tokens_cap,
                            max_seq_length=a.max_seq_length)
        log.append({"task": task, "method": f"{attn}+{kv}", "mode": mode, "id": row["id"], "model": str(a.model),
                    "seconds": time.perf_counter() - t0, "turns": [t.__dict__ for t in turns]})
    md, csv_path = write_tables(log.rows, a.output_dir)
    png = plot_by_turn(log.rows, f"{a.output_dir}/score_by_turn.png")
    print("\n" + md.read_text())
    print(f"wrote {md}, {csv_path}, {png}")


if __name__ == "__main__":
    main()
