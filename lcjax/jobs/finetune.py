"""Fine-tune a model on text: `python -m experiments.finetune` (installed: `lcjax-finetune`).

With no flags: the built-in SmolLM2-135M on the 49 Paul Graham essays (one in ten held out), 512-token rows,
40 steps. The held-out loss is measured before, every `--eval-every` steps and after; it and every step's loss,
learning rate, gradient norm and tokens/s go to `<output_dir>/metrics.jsonl` as they happen; checkpoints (orbax)
every `--checkpoint-every` steps, and a rerun with the same `--output_dir` resumes from the newest one.
`--export DIR` writes the result as a transformers checkpoint (weights, config and tokenizer). Loss curves also go
to TensorBoard event files in `<output_dir>/tensorboard` and, at the end, to `<output_dir>/loss.png`.

`--mesh data=D,fsdp=F,tensor=T,context=C` spreads the step over D x F x T x C devices by `lcjax.sharding`'s
rules: the batch over "data" and "fsdp" (with "fsdp" the parameters and optimiser state are split too), heads and
MLP over "tensor", the sequence over "context" (load-balanced, attention gathering keys and values). On several
hosts, start the same command on each with `--distributed` (and, outside SLURM and Cloud TPU, the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID variables `jax.distributed.initialize` reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter
from tqdm import tqdm

import lcjax
from lcjax.config import FACTOR_SCALINGS, extend_context
from lcjax.loading.export import save_checkpoint
from lcjax.models.params import param_shardings
from lcjax.models.transformer import REMAT_POLICIES
from lcjax.sharding import MESH_AXES, logical_sharding, make_mesh
from lcjax.train import TrainConfig, init_state, loss_and_count, train_step
from lcjax.train.checkpoint import CheckpointError, Checkpoints
from lcjax.train.data import (
    BUILTIN_CORPORA,
    Batches,
    corpus_files,
    document_separator,
    read_documents,
    split_documents,
    tokenized_rows,
)
from lcjax.train.longrope_search import apply_factors, read_factors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL, help="built-in name, transformers directory or .gguf")
    corpora = ", ".join(BUILTIN_CORPORA)
    p.add_argument("--data", default="paul-graham-essays", help=f"a file, a directory of them, or one of {corpora}")
    p.add_argument("--held-out", type=float, default=0.1, help="share of documents kept for the held-out loss")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows the loss is measured on (at most)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out losses (0: first and last only)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--rope",
        default=None,
        help=f"extend the context: TYPE:FACTOR with TYPE one of {', '.join(FACTOR_SCALINGS)} (e.g. yarn:4), or "
        "longrope=FILE (factors `experiments.longrope` wrote); the model's own RoPE by default",
    )
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=4, help="warmup steps")
    p.add_argument("--decay", default="cosine", choices=("cosine", "linear"))
    p.add_argument("--remat", default="nothing_saveable", choices=(*REMAT_POLICIES, "none"))
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="data=1", help="devices per axis, e.g. data=1,fsdp=8,tensor=1,context=1")
    p.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() first")
    p.add_argument("--output-dir", default="runs/finetune")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (0: none)")
    p.add_argument("--export", default=None, help="write the result as a transformers checkpoint here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.distributed:
        jax.distributed.initialize()
    try:
        a.rope_scaling = rope_scaling(a.rope)
        a.mesh_shape = mesh_shape(a.mesh)
        batch_split = a.mesh_shape["data"] * a.mesh_shape["fsdp"]
        if a.batch % batch_split:
            raise ValueError(f"--batch {a.batch} does not split over data x fsdp = {batch_split} devices.")
        if a.seq_len % (2 * a.mesh_shape["context"]) and a.mesh_shape["context"] > 1:
            raise ValueError(
                f"--seq-len {a.seq_len} does not split into 2 x context = {2 * a.mesh_shape['context']} equal "
                "chunks (context parallelism gives each device one early and one late chunk)."
            )
        counts = {"--seq-len": a.seq_len, "--batch": a.batch, "--steps": a.steps, "--eval-rows": a.eval_rows,
                  "--micro-batches": a.micro_batches, "--checkpoint-every": a.checkpoint_every + 1,
                  "--eval-every": a.eval_every + 1}  # fmt: skip
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


def rope_scaling(spec: str | None) -> tuple[str, float | dict] | None:
    """("yarn", 4.0) from "yarn:4", ("longrope", factors) from "longrope=FILE" (`read_factors`); None for None."""
    if spec is None:
        return None
    if spec.startswith("longrope="):
        return "longrope", read_factors(spec.partition("=")[2])
    kind, _, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if kind not in FACTOR_SCALINGS or value <= 1:
        raise ValueError(f"--rope {spec!r}: give TYPE:FACTOR, TYPE one of {', '.join(FACTOR_SCALINGS)}, FACTOR > 1.")
    return kind, value


def mesh_shape(spec: str) -> dict[str, int]:
    """{"data": D, "fsdp": F, "tensor": T, "context": C} from "data=D,fsdp=F,...", unnamed axes 1; the product must
    divide the devices (the step runs on the first D x F x T x C)."""
    shape = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition("=")
        if name not in shape or not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"--mesh {spec!r}: give axis=N pairs with positive N; the axes are {', '.join(MESH_AXES)}."
            )
        shape[name] = int(size)
    n = int(np.prod(list(shape.values())))
    if jax.device_count() % n:
        raise ValueError(
            f"--mesh {spec!r} asks for {n} devices, which does not divide the {jax.device_count()} "
            f"({jax.devices()[0].platform}) this run sees."
        )
    return shape


def global_batch(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """`rows` (the same on every host) as one array placed by `sharding`; each host supplies only the pieces its
    own devices hold, so this works on one host and on many."""
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


# one compiled loss for every evaluation of a run (a jit of a fresh closure would compile again each time)
_loss_and_count = jax.jit(loss_and_count, static_argnames=("config", "mesh"))


def held_out_loss(state, model, rows: np.ndarray, batch: int, config: TrainConfig, mesh: Mesh) -> float:
    """Mean next-token loss over the held-out rows."""
    total, count = 0.0, 0.0
    sharding = logical_sharding((batch, rows.shape[1]), ("batch", "seq"), mesh)
    lengths = global_batch(np.full((batch,), rows.shape[1], np.int32), NamedSharding(mesh, P(sharding.spec[0])))
    for i in range(0, len(rows) - batch + 1, batch):
        s, n = _loss_and_count(state.params, model, global_batch(rows[i : i + batch], sharding), lengths, config, mesh)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def plot_losses(metrics: Path, path: Path) -> None:
    """The training loss of every step and the held-out losses that `metrics` (the run's JSONL) holds, as a PNG."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    held_out = dict(sorted((r["step"], r["held_out_loss"]) for r in rows if "held_out_loss" in r))
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(list(train), list(train.values()), lw=1, alpha=0.7, label="training batch")
    ax.plot(list(held_out), list(held_out.values()), "o-", label="held out")
    ax.set(xlabel="step", ylabel="next-token loss (nats)")
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    a = parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = lcjax.load_model(a.model, dtype="float32", layer_layout="stacked")
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; fine-tuning on text needs one.")
    if a.rope_scaling is not None:
        try:
            kind, value = a.rope_scaling
            extended = (
                apply_factors(model.config, value) if kind == "longrope" else extend_context(model.config, kind, value)
            )
            model = lcjax.Transformer(model.params, extended)
        except ValueError as e:
            raise SystemExit(f"--rope {a.rope}: {e}") from None
    train_docs, eval_docs = split_documents(read_documents(corpus_files(a.data)), a.held_out, a.seed)
    encode = lambda text: tok.encode(text, add_special_tokens=False)
    separator = document_separator(tok)
    try:
        batches = Batches(tokenized_rows(train_docs, encode, a.seq_len, separator), a.batch, a.micro_batches, a.seed)
        eval_rows = tokenized_rows(eval_docs, encode, a.seq_len, separator)[: a.eval_rows]
    except ValueError as e:
        raise SystemExit(f"--data {a.data} with --seq-len {a.seq_len}: {e}") from None
    mesh = make_mesh(**a.mesh_shape, devices=jax.devices()[: int(np.prod(list(a.mesh_shape.values())))])
    params = jax.device_put(model.params, param_shardings(model.config, mesh))
    state = init_state(params, a.train)
    del params
    model = lcjax.Transformer({}, model.config, model.attention, model.positions)  # config and transforms only
    shape = (a.micro_batches, a.batch, a.seq_len)
    token_sharding = logical_sharding(shape, (None, "batch", "seq"), mesh)
    length_sharding = NamedSharding(mesh, P(*token_sharding.spec[:2]))
    run = {"data": a.data, "seed": a.seed, "seq_len": a.seq_len, "batch": a.batch, "micro_batches": a.micro_batches}
    keep = a.checkpoint_every > 0
    writes = jax.process_index() == 0  # one host writes the logs
    with contextlib.ExitStack() as stack:
        checkpoints = stack.enter_context(Checkpoints(out / "checkpoints", every=a.checkpoint_every)) if keep else None
        if keep and checkpoints.latest_step() is not None:
            try:
                state, record = checkpoints.restore(like=state)
            except CheckpointError as e:
                raise SystemExit(str(e)) from None
            differs = {k: (record.get(k), v) for k, v in run.items() if k in record and record[k] != v}
            if differs:
                raise SystemExit(
                    f"{out / 'checkpoints'} was written by a run with other data settings "
                    f"({', '.join(f'{k}: {was!r}, now {now!r}' for k, (was, now) in differs.items())}); resuming "
                    "would not continue its loss curve. Use another --output-dir or the same settings."
                )
            print(f"resumed from step {int(state.step)} (data step {record['data_step']})")
        log = stack.enter_context(open(out / "metrics.jsonl", "a")) if writes else None
        board = stack.enter_context(SummaryWriter(str(out / "tensorboard"))) if writes else None

        def evaluate(step: int) -> float:
            loss = held_out_loss(state, model, eval_rows, a.batch, a.train, mesh)
            if writes:
                log.write(json.dumps({"step": step, "held_out_loss": loss}) + "\n")
                log.flush()
                board.add_scalar("held_out/loss", loss, step)
            return loss

        before = evaluate(int(state.step))
        print(f"{len(batches.rows)} training rows, {len(eval_rows)} held-out rows of {a.seq_len} tokens; "
              f"held-out loss {before:.4f}")  # fmt: skip
        bar = stack.enter_context(tqdm(range(int(state.step), a.steps), desc="finetune", unit="step"))
        lengths = global_batch(np.full(shape[:2], a.seq_len, np.int32), length_sharding)  # packed rows are full
        for step in bar:
            tokens = global_batch(batches.at(step), token_sharding)
            t0 = time.perf_counter()
            state, metrics = train_step(state, model, tokens, lengths, a.train, mesh)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tokens_per_s=f"{metrics['tokens_per_s']:,.0f}")
            if writes:
                log.write(json.dumps({"step": step + 1, **metrics}) + "\n")
                log.flush()
                for name, value in metrics.items():
                    board.add_scalar(f"train/{name}", value, step + 1)
            if keep:
                checkpoints.save(step + 1, state, {"data_step": step + 1, **run}, force=step + 1 == a.steps)
            if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
                bar.write(f"step {step + 1}: held-out loss {evaluate(step + 1):.4f}")
        after = evaluate(a.steps)
        if writes:
            plot_losses(out / "metrics.jsonl", out / "loss.png")
    print(f"held-out loss {before:.4f} -> {after:.4f} after {a.steps} steps")
    if a.export:
        trained = jax.tree.map(np.asarray, process_allgather(state.params, tiled=True))
        if writes:
            save_checkpoint(trained, model.config, a.export, tokenizer=tok)
            print(f"wrote a transformers checkpoint to {a.export}")


if __name__ == "__main__":
    main()
