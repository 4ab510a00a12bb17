"""LongRoPE end to end (Ding et al. 2024): search, fine-tune, search again, short-context factors, export.

    python -m experiments.longrope [--model smollm2-135m] --target-length 65536 [--stages 2]
        [--finetune-steps 400] [--corpus python-stdlib] [--documents 3] [--fitness perplexity|needle]
        [--population 64] [--generations 40] [--output-dir runs/longrope] [--export DIR]

Stage lengths rise 8x at a time to the target, as in the paper (4K -> 128K/256K -> 2048K), the first at least
twice the model's trained context: 8K -> 64K in two stages is 16K then 64K. Stage 1 searches factors at its
length and, with `--finetune-steps`, fine-tunes there (`experiments.finetune`, on the corpus's training split);
each later stage searches again on that model without training, seeded with the previous stage's factors. Last,
short factors are searched at the trained length (cap 1.25, the paper's 1.25 x scale at scale 1), since the
attention factor applies there too. Fitness: the mean next-token loss (log perplexity) of `--documents` rows of
the stage's length from the corpus's training split, or `--fitness needle` (LongRoPE2's needle-driven
perplexity: the loss of passkey answers only).

Everything lands in `--output-dir` as it finishes (each search's population after every generation, each stage's
factors, the fine-tune's checkpoints), so a rerun with the same directory resumes. The result: `factors.json`
(for `experiments.context_eval --methods longrope=...` and `experiments.finetune --rope longrope=...`) and, with
`--export`, a transformers directory whose `rope_scaling` is `rope_type: longrope` (n-hat, when searched above 0,
in lcjax's own key: only lcjax applies it).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

import lcjax
from lcjax.config import ModelConfig, with_longrope
from lcjax.jobs import finetune
from lcjax.loading.export import save_checkpoint
from lcjax.tasks.passkey import passkey_sample
from lcjax.train.data import (
    BUILTIN_CORPORA,
    corpus_files,
    document_separator,
    read_documents,
    split_documents,
    token_stream,
)
from lcjax.train.longrope_search import (
    Genome,
    SearchConfig,
    model_fitness,
    read_factors,
    search,
    seed_genomes,
    write_factors,
)

SHORT_CAP = 1.25  # the paper's cap of 1.25 x scale, at scale 1 (the trained length)


def stage_lengths(native: int, target: int, stages: int) -> list[int]:
    """Each stage's length: the target last, each earlier one an eighth of the next but at least 2 x native."""
    lengths = [target]
    for _ in range(stages - 1):
        lengths.insert(0, max(2 * native, lengths[0] // 8))
    if lengths[0] <= native or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(
            f"{stages} stages from {native} to {target} tokens would not each be longer than the last "
            f"({lengths}); use fewer stages or a longer target."
        )
    return lengths


def needle_rows(tokenizer, length: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 `[count, length]`, counted bool): passkey prompts with their answers appended, padded with
    end-of-sequence to `length`; only the answer's tokens count (LongRoPE2's needle-driven perplexity)."""
    pad = document_separator(tokenizer)
    rows, counted = np.full((count, length), pad, np.int32), np.zeros((count, length), bool)
    for i in range(count):
        s = passkey_sample(tokenizer, length - 32, i / max(1, count - 1), seed=10_000 + i)
        answer = tokenizer.encode(s.answer, add_special_tokens=False)
        ids = list(s.prompt_ids) + answer
        if len(ids) > length:
            raise ValueError(f"a passkey prompt of {len(ids)} tokens does not fit {length}.")
        rows[i, : len(ids)] = ids
        counted[i, len(s.prompt_ids) : len(ids)] = True
    return rows, counted


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=lcjax.DEFAULT_MODEL, help="built-in name, transformers directory or .gguf")
    p.add_argument("--target-length", type=int, required=True)
    p.add_argument("--stages", type=int, default=1, help="searches at rising lengths (8x apart) to the target")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps after the first search (0: none)")
    p.add_argument("--finetune-lr", type=float, default=2e-5, help="peak learning rate (the paper's 2e-5)")
    p.add_argument(
        "--corpus", default="python-stdlib", help=f"a file, a directory or one of {', '.join(BUILTIN_CORPORA)}"
    )
    p.add_argument("--held-out", type=float, default=0.1, help="share of documents no search or fine-tune reads")
    p.add_argument("--documents", type=int, default=3, help="rows of each stage's length the fitness reads")
    p.add_argument("--fitness", default="perplexity", choices=("perplexity", "needle"))
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--no-short", action="store_true", help="keep the model's own RoPE within its trained length")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/longrope")
    p.add_argument("--export", default=None, help="write the extended model as a transformers directory here")
    a = p.parse_args(argv)
    for flag in ("target_length", "stages", "documents", "population", "generations"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}.")
    if a.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0, got {a.finetune_steps}.")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = lcjax.load_model(a.model, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer; the fitness reads text.")
    plain = model.config
    if plain.rope.rope_type != "default":
        raise SystemExit(f"{a.model}'s RoPE is already scaled ({plain.rope.rope_type!r}); LongRoPE extends plain RoPE.")
    native = plain.max_position_embeddings
    try:
        lengths = stage_lengths(native, a.target_length, a.stages)
    except ValueError as e:
        raise SystemExit(f"--target-length {a.target_length} --stages {a.stages}: {e}") from None
    stream = None  # the training documents' ids, joined (read by the perplexity fitness only)
    if a.fitness == "perplexity":
        train_docs, _ = split_documents(read_documents(corpus_files(a.corpus)), a.held_out, a.seed)
        stream = token_stream([tok.encode(d, add_special_tokens=False) for d in train_docs], document_separator(tok))
    mesh = Mesh(np.asarray(jax.devices()), ("genomes",)) if jax.device_count() > 1 else None
    dims = plain.rotary_dim // 2

    def documents(length: int) -> tuple[np.ndarray, np.ndarray | None]:
        if stream is None:
            return needle_rows(tok, length, a.documents)
        if len(stream) // length < a.documents:
            raise SystemExit(f"--corpus {a.corpus} holds {len(stream) // length} training rows of {length} tokens; "
                             f"--documents asks for {a.documents}.")  # fmt: skip
        return stream[: a.documents * length].reshape(a.documents, length), None

    def search_config(scale: float, stage: int, **settings) -> SearchConfig:
        half, quarter = max(1, a.population // 2), max(1, a.population // 4)
        return SearchConfig(
            scale=scale, dims=dims, population=a.population, parents=half, mutations=quarter, crossovers=quarter,
            generations=a.generations, seed=a.seed + stage, **settings,
        )  # fmt: skip

    def run_search(name: str, config: SearchConfig, seeds: list[Genome], length: int, scale: float) -> Genome:
        tokens, counted = documents(length)
        fitness = model_fitness(model, tokens, scale, native, counted, mesh)
        result = search(fitness, config, seeds, checkpoint=out / f"{name}_search.json")
        print(f"{name}: best perplexity {np.exp(result.best_loss):.3f} at {length} tokens (n-hat {result.best.n_hat})")
        return result.best

    best = None
    for i, length in enumerate(lengths):
        path = out / f"stage{i + 1}_factors.json"
        scale = length / native
        if path.exists():
            f = read_factors(path)
            best = Genome(tuple(f["long_factor"]), f["n_hat"])
        else:
            config = search_config(scale, i)
            seeds = seed_genomes(config, plain.rope.theta, plain.rotary_dim, native)
            if best is not None:  # the previous stage's factors, stretched to this stage's scale
                seeds.append(Genome(tuple(x * scale / (lengths[i - 1] / native) for x in best.factors), best.n_hat))
            best = run_search(f"stage{i + 1}", config, seeds, length, scale)
            write_factors(path, with_longrope(plain, best.factors, length, n_hat=best.n_hat))
        if i == 0 and a.finetune_steps:
            model = fine_tuned(a, path, length, out / "stage1_finetuned", plain, tok)

    scale = a.target_length / native
    short = None
    if not a.no_short:
        path = out / "short_factors.json"
        if path.exists():
            short = tuple(read_factors(path)["short_factor"])
        else:
            config = search_config(scale, len(lengths), max_factor=SHORT_CAP, search_n_hat=False)
            short = run_search("short", config, [Genome((1.0,) * dims)], native, scale).factors
            write_factors(path, with_longrope(plain, best.factors, a.target_length, short, best.n_hat))
    final = with_longrope(plain, best.factors, a.target_length, short, best.n_hat)
    write_factors(out / "factors.json", final)
    print(f"wrote {out / 'factors.json'}")
    if a.export:
        params = jax.tree.map(np.asarray, model.params)
        save_checkpoint(params, final, a.export, tokenizer=tok)
        print(f"wrote a transformers checkpoint to {a.export}")


def fine_tuned(a, factors: Path, length: int, export: Path, plain: ModelConfig, tok) -> lcjax.Transformer:
    """The model after `a.finetune_steps` steps at `length` under `factors` (resumed or reused if done), with the
    plain config back (later searches set the factors themselves)."""
    if not (export / "config.json").exists():
        finetune.main([
            "--model", str(a.model), "--rope", f"longrope={factors}", "--seq-len", str(length),
            "--steps", str(a.finetune_steps), "--lr", str(a.finetune_lr), "--warmup", str(min(20, a.finetune_steps)),
            "--data", a.corpus, "--held-out", str(a.held_out), "--seed", str(a.seed), "--eval-rows", "2",
            "--eval-every", "0", "--compute-dtype", "bfloat16" if a.dtype == "bfloat16" else "float32",
            "--output-dir", str(export.parent / "stage1_finetune"), "--export", str(export),
        ])  # fmt: skip
    tuned, _ = lcjax.load_model(export, dtype=a.dtype)
    return dataclasses.replace(tuned, config=plain, positions=None)


if __name__ == "__main__":
    main()
