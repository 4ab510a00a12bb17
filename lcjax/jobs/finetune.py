"""Fine-tune a model on text: `python -m experiments.finetune` (installed: `lcjax-finetune`).

With no flags: the built-in SmolLM2-135M on the 49 Paul Graham essays (one in ten held out), 512-token rows,
40 steps. The held-out loss is measured before and after; every step's loss, learning rate, gradient norm and
tokens/s go to `<output_dir>/metrics.jsonl` as they happen; checkpoints (orbax) every `--checkpoint-every` steps,
and a rerun with the same `--output_dir` resumes from the newest one. `--export DIR` writes the result as a
transformers checkpoint. `--mesh data=D,model=M` spreads the step over D x M devices (the batch over "data",
heads and MLP over "model", by `lcjax.sharding`'s rules).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import lcjax
from lcjax.loading.export import save_checkpoint
from lcjax.models.params import param_shardings
from lcjax.models.transformer import REMAT_POLICIES
from lcjax.sharding import make_mesh
from lcjax.train import TrainConfig, init_state, loss_and_count, train_step
from lcjax.train.checkpoint import Checkpoints
from lcjax.train.data import Batches, corpus_files, read_documents, split_documents, tokenized_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL, help="built-in name, transformers directory or .gguf")
    p.add_argument("--data", default="paul-graham-essays", help="a file, a directory of them, or a built-in corpus")
    p.add_argument("--held-out", type=float, default=0.1, help="share of documents kept for the held-out loss")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows the loss is measured on (at most)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=4, help="warmup steps")
    p.add_argument("--decay", default="cosine", choices=("cosine", "linear"))
    p.add_argument("--remat", default="nothing_saveable", choices=(*REMAT_POLICIES, "none"))
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="data=1,model=1", help="devices per axis, e.g. data=2,model=4")
    p.add_argument("--output-dir", default="runs/finetune")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (0: none)")
    p.add_argument("--export", default=None, help="write the result as a transformers checkpoint here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        a.mesh_shape = mesh_shape(a.mesh)
        counts = {"--seq-len": a.seq_len, "--batch": a.batch, "--steps": a.steps, "--eval-rows": a.eval_rows,
                  "--micro-batches": a.micro_batches, "--checkpoint-every": a.checkpoint_every + 1}  # fmt: skip
        for flag, value in counts.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}.")
        a.train = TrainConfig(
            learning_rate=a.lr,
            warmup_steps=min(a.warmup, a.steps),
            total_steps=a.steps,
            decay=a.decay,
            micro_batches=a.micro_batches,
            remat=None if a.remat == "none" else a.remat,
            compute_dtype=a.compute_dtype,
        )
    except ValueError as e:
        p.error(str(e))
    return a


def mesh_shape(spec: str) -> dict[str, int]:
    """{"data": D, "model": M} from "data=D,model=M", checked against the devices this process sees (the step
    runs on the first D x M)."""
    shape = {"data": 1, "model": 1}
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition("=")
        if name not in shape or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {spec!r}: give data=N,model=M with positive sizes (axes: data, model).")
        shape[name] = int(size)
    if shape["data"] * shape["model"] > jax.device_count():
        raise ValueError(
            f"--mesh {spec!r} asks for {shape['data'] * shape['model']} devices; this process sees "
            f"{jax.device_count()} ({jax.devices()[0].platform})."
        )
    return shape


# one compiled loss for every evaluation of a run (a jit of a fresh closure would compile again each time)
_loss_and_count = jax.jit(loss_and_count, static_argnames=("config",))


def held_out_loss(state, model, rows: np.ndarray, batch: int, config: TrainConfig) -> float:
    """Mean next-token loss over the held-out rows."""
    total, count = 0.0, 0.0
    for i in range(0, len(rows) - batch + 1, batch):
        tokens = jnp.asarray(rows[i : i + batch])
        lengths = jnp.full((batch,), tokens.shape[1], jnp.int32)
        s, n = _loss_and_count(state.params, model, tokens, lengths, config=config)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def main(argv=None) -> None:
    a = parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = lcjax.load_model(a.model, dtype="float32", layer_layout="stacked")
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; fine-tuning on text needs one.")
    train_docs, eval_docs = split_documents(read_documents(corpus_files(a.data)), a.held_out, a.seed)
    encode = lambda text: tok.encode(text, add_special_tokens=False)
    separator = tok.eos_token_id if tok.eos_token_id is not None else 0
    try:
        batches = Batches(tokenized_rows(train_docs, encode, a.seq_len, separator), a.batch, a.micro_batches, a.seed)
        eval_rows = tokenized_rows(eval_docs, encode, a.seq_len, separator)[: a.eval_rows]
    except ValueError as e:
        raise SystemExit(f"--data {a.data} with --seq-len {a.seq_len}: {e}") from None
    mesh = make_mesh(**a.mesh_shape, devices=jax.devices()[: a.mesh_shape["data"] * a.mesh_shape["model"]])
    params = jax.device_put(model.params, param_shardings(model.config, mesh))
    state = init_state(params, a.train)
    del params
    model = lcjax.Transformer({}, model.config, model.attention, model.positions)  # config and transforms only
    data_sharding = NamedSharding(mesh, P(None, "data"))
    keep = a.checkpoint_every > 0
    with (
        Checkpoints(out / "checkpoints", every=a.checkpoint_every) if keep else contextlib.nullcontext() as checkpoints
    ):
        if keep and checkpoints.latest_step() is not None:
            state, record = checkpoints.restore(like=state)
            print(f"resumed from step {int(state.step)} ({record})")
        before = held_out_loss(state, model, eval_rows, a.batch, a.train)
        print(f"{len(batches.rows)} training rows, {len(eval_rows)} held-out rows of {a.seq_len} tokens; "
              f"held-out loss {before:.4f}")  # fmt: skip
        with open(out / "metrics.jsonl", "a") as log:
            for step in tqdm(range(int(state.step), a.steps), desc="finetune", unit="step"):
                tokens = jax.device_put(batches.at(step), data_sharding)
                lengths = jax.device_put(np.full(tokens.shape[:2], a.seq_len, np.int32), data_sharding)
                t0 = time.perf_counter()
                state, metrics = train_step(state, model, tokens, lengths, a.train)
                metrics = {k: float(v) for k, v in metrics.items()}
                seconds = time.perf_counter() - t0
                log.write(json.dumps({"step": step + 1, **metrics, "tokens_per_s": metrics["tokens"] / seconds}) + "\n")
                log.flush()
                if keep:
                    checkpoints.save(step + 1, state, {"data_step": step + 1}, force=step + 1 == a.steps)
    after = held_out_loss(state, model, eval_rows, a.batch, a.train)
    print(f"held-out loss {before:.4f} -> {after:.4f} after {a.steps} steps")
    if a.export:
        trained = jax.tree.map(np.asarray, state.params)
        save_checkpoint(trained, model.config, a.export)
        print(f"wrote a transformers checkpoint to {a.export}")


if __name__ == "__main__":
    main()
