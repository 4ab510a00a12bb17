"""LongRoPE's evolutionary search for per-frequency RoPE rescale factors (Ding et al. 2024, arXiv 2402.13753).

A genome is one rescale factor per RoPE frequency, non-decreasing from the highest frequency to the lowest and in
`[1, cap]`, plus n-hat, the number of first positions left unscaled (the paper searches it; the released code does
not). The search (the paper's Algorithm 1) starts from PI, NTK and YaRN factors and their mutations, keeps the
`parents` fittest genomes each generation and adds `mutations` mutated and `crossovers` crossed children, never a
genome seen before. A mutation resamples each factor with probability `mutation_prob` between its neighbours (so
the order holds) and moves n-hat to a neighbouring choice; a crossover takes each factor from either parent and
restores the order with a running maximum.

Fitness is any function from a list of genomes to their losses (lower is better); `model_fitness` gives the mean
next-token loss of a model on long documents under each genome (log perplexity), or on answer tokens only
(LongRoPE2's needle-driven perplexity), all genomes of a call in one compiled forward, spread over a mesh's
devices. The population is written after every generation, so a killed search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from tqdm import tqdm

from lcjax import positions as positions_lib
from lcjax.config import ModelConfig, with_longrope
from lcjax.models.attention import AttentionFn
from lcjax.models.transformer import Transformer, forward
from lcjax.train.loss import next_token_targets, token_loss

# the paper's candidate values of n-hat
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The search's settings; the defaults are the paper's.

    scale: target length / original length. dims: factors per genome (rotary_dim // 2). max_factor: the cap of
    every factor (None: 1.25 x scale, the paper's; the released code's `dim_mono` search uses 1 + scale). step:
    the factors' grid. search_n_hat: whether n-hat evolves (else it stays 0)."""

    scale: float
    dims: int
    population: int = 64
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    mutation_prob: float = 0.3
    generations: int = 40
    step: float = 0.01
    max_factor: float | None = None
    search_n_hat: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.scale <= 1 or self.dims < 1:
            raise ValueError(f"need scale > 1 and dims >= 1, got {self.scale} and {self.dims}.")
        if not 0 < self.parents <= self.population or self.mutations + self.crossovers < 1:
            raise ValueError(
                f"need 0 < parents <= population and some children; got parents {self.parents}, population "
                f"{self.population}, {self.mutations} mutations and {self.crossovers} crossovers."
            )
        if self.cap <= 1:
            raise ValueError(f"max_factor must be > 1, got {self.cap}.")

    @property
    def cap(self) -> float:
        return 1.25 * self.scale if self.max_factor is None else self.max_factor


@dataclasses.dataclass(frozen=True)
class Genome:
    """Rescale factors `[dims]` (frequency i's angle is divided by factors[i]) and n-hat."""

    factors: tuple[float, ...]
    n_hat: int = 0

    def key(self) -> tuple:
        """What makes two genomes the same (factors on a 1e-6 grid)."""
        return tuple(round(f, 6) for f in self.factors), self.n_hat


def valid(genome: Genome, config: SearchConfig) -> bool:
    """Whether `genome` keeps the constraints: `dims` factors, non-decreasing, in [1, cap], n-hat a choice."""
    f = np.asarray(genome.factors)
    return (
        f.shape == (config.dims,)
        and bool(np.all(np.diff(f) >= 0))
        and f[0] >= 1.0 - 1e-9
        and f[-1] <= config.cap + 1e-9
        and genome.n_hat in (N_HAT_CHOICES if config.search_n_hat else (0,))
    )


def _snap(factors: np.ndarray, config: SearchConfig) -> tuple[float, ...]:
    """Onto the step grid inside [1, cap], then made non-decreasing."""
    f = np.clip(np.round(np.asarray(factors, np.float64) / config.step) * config.step, 1.0, config.cap)
    return tuple(float(x) for x in np.maximum.accumulate(f))


def seed_genomes(config: SearchConfig, theta: float, rotary_dim: int, original_length: int) -> list[Genome]:
    """PI (every factor = scale), NTK (the base grown by scale^(d / (d - 2))) and YaRN's factors, n-hat 0."""
    d = rotary_dim
    i = np.arange(d // 2)
    base_inv = 1.0 / theta ** (2 * i / d)
    yarn_inv = np.asarray(positions_lib.yarn(d, theta, config.scale, original_length).inv_freq, np.float64)
    seeds = {
        "pi": np.full(d // 2, config.scale),
        "ntk": config.scale ** (2 * i / (d - 2)),
        "yarn": base_inv / yarn_inv,
    }
    return [Genome(_snap(f, config)) for f in seeds.values()]


def mutate(genome: Genome, config: SearchConfig, rng: np.random.Generator) -> Genome:
    """Each factor, with probability `mutation_prob`, resampled on the grid between its (new) neighbours; n-hat
    moved to a neighbouring choice with the same probability."""
    f = list(genome.factors)
    for i in range(len(f)):
        if rng.random() < config.mutation_prob:
            lo = f[i - 1] if i else 1.0
            hi = f[i + 1] if i + 1 < len(f) else config.cap
            steps = int(math.floor((hi - lo) / config.step + 1e-9))
            f[i] = lo + config.step * int(rng.integers(0, steps + 1)) if steps > 0 else lo
    n_hat = genome.n_hat
    if config.search_n_hat and rng.random() < config.mutation_prob:
        index = N_HAT_CHOICES.index(n_hat) + int(rng.choice([-1, 1]))
        n_hat = N_HAT_CHOICES[min(max(index, 0), len(N_HAT_CHOICES) - 1)]
    return Genome(_snap(np.asarray(f), config), n_hat)


def crossover(a: Genome, b: Genome, config: SearchConfig, rng: np.random.Generator) -> Genome:
    """Each factor from either parent, the order restored by a running maximum; n-hat from either."""
    pick = rng.random(config.dims) < 0.5
    f = np.where(pick, np.asarray(a.factors), np.asarray(b.factors))
    return Genome(_snap(f, config), a.n_hat if rng.random() < 0.5 else b.n_hat)


def _children(parents: list[Genome], count: int, make, seen: set) -> list[Genome]:
    """`count` new genomes from `make(parents)`, none seen before (gives up on a slot after 100 tries)."""
    out = []
    for _ in range(count):
        for _ in range(100):
            child = make(parents)
            if child.key() not in seen:
                seen.add(child.key())
                out.append(child)
                break
    return out


@dataclasses.dataclass
class SearchResult:
    best: Genome
    best_loss: float
    history: list[float]  # the best loss after each generation
    population: list[tuple[Genome, float]]


def search(
    fitness: Callable[[list[Genome]], np.ndarray],
    config: SearchConfig,
    seeds: Sequence[Genome],
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> SearchResult:
    """Runs the evolutionary search; `fitness(genomes) -> losses [len(genomes)]` (lower is better).

    With `checkpoint` (a JSON file), the population, losses, generation and random state are written after every
    generation, and a search started on an existing file continues from it (the same settings required)."""
    rng = np.random.default_rng(config.seed)
    path = None if checkpoint is None else Path(checkpoint)
    state = _load(path, config) if path is not None and path.exists() else None
    if state is not None:
        generation, scored, history, seen, rng.bit_generator.state = state
    else:
        seeds = [Genome(_snap(g.factors, config), g.n_hat) for g in seeds]
        bad = [g for g in seeds if not valid(g, config)]
        if bad:
            raise ValueError(f"seed genome {bad[0]} breaks the constraints of {config}.")
        seen = {g.key() for g in seeds}
        population = list(seeds) + _children(
            list(seeds), config.population - len(seeds), lambda p: mutate(p[rng.integers(len(p))], config, rng), seen
        )
        scored = list(zip(population, map(float, fitness(population))))
        generation, history = 0, []
        if path is not None:
            _save(path, config, 0, scored, history, seen, rng.bit_generator.state)
    bar = tqdm(range(generation, config.generations), desc="longrope search", unit="gen", disable=not progress)
    for generation in bar:
        parents = [g for g, _ in sorted(scored, key=lambda s: s[1])[: config.parents]]
        children = _children(parents, config.mutations, lambda p: mutate(p[rng.integers(len(p))], config, rng), seen)
        children += _children(
            parents,
            config.crossovers,
            lambda p: (
                crossover(*(p[i] for i in rng.choice(len(p), 2, replace=False)), config, rng)
                if len(p) > 1
                else mutate(p[0], config, rng)
            ),
            seen,
        )
        losses = dict((g.key(), s) for g, s in scored)
        scored = [(g, losses[g.key()]) for g in parents]
        if children:
            scored += list(zip(children, map(float, fitness(children))))
        best = min(s for _, s in scored)
        history.append(best)
        bar.set_postfix(best_perplexity=f"{math.exp(min(best, 700)):.3f}")
        if path is not None:
            _save(path, config, generation + 1, scored, history, seen, rng.bit_generator.state)
    best_genome, best_loss = min(scored, key=lambda s: s[1])
    return SearchResult(best_genome, best_loss, history, sorted(scored, key=lambda s: s[1]))


def _save(path: Path, config: SearchConfig, generation: int, scored, history, seen: set, rng_state) -> None:
    record = {
        "config": dataclasses.asdict(config),
        "generation": generation,
        "population": [{"factors": list(g.factors), "n_hat": g.n_hat, "loss": s} for g, s in scored],
        "history": history,
        "seen": [[list(f), n] for f, n in sorted(seen)],  # every genome ever made: none is made twice
        "rng": rng_state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # a search killed mid-write keeps the previous generation


def _load(path: Path, config: SearchConfig):
    try:
        record = json.loads(path.read_text())
        saved = SearchConfig(**record["config"])
        scored = [(Genome(tuple(p["factors"]), p["n_hat"]), float(p["loss"])) for p in record["population"]]
        seen = {(tuple(f), n) for f, n in record["seen"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a LongRoPE search checkpoint ({type(e).__name__}: {e}).") from None
    if saved != config:
        raise ValueError(f"{path} was written by a search with other settings ({saved}); use another path.")
    return record["generation"], scored, list(record["history"]), seen, record["rng"]


def longrope_attention_factor(scale: float, original_length: int) -> float:
    """LongRoPE's ("su") attention factor, sqrt(1 + ln s / ln L_original), as Phi-3 configs imply."""
    return math.sqrt(1 + math.log(scale) / math.log(original_length)) if scale > 1 else 1.0


def model_fitness(
    model: Transformer,
    tokens: np.ndarray,
    scale: float,
    original_length: int,
    counted: np.ndarray | None = None,
    mesh: Mesh | None = None,
    genomes_per_call: int | None = None,
) -> Callable[[list[Genome]], np.ndarray]:
    """Fitness: each genome's mean next-token loss of `model` on `tokens: int [documents, length]`.

    counted: bool `[documents, length]`, the tokens whose prediction counts (None: all; answer tokens only for
    LongRoPE2's needle-driven perplexity). The model's own RoPE frequencies (`config.rope.theta`) are rescaled;
    cos and sin carry LongRoPE's attention factor for `scale`. All genomes of a call run in one compiled
    forward; with `mesh`, they are split over its devices (the documents and the model on each device whole).
    """
    c = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    counted = jnp.ones(tokens.shape, bool) if counted is None else jnp.asarray(counted, bool)
    base_inv = jnp.asarray(positions_lib.base_inv_freq(c.rope.theta, c.rotary_dim))
    factor = longrope_attention_factor(scale, original_length)
    devices = 1 if mesh is None else mesh.devices.size

    def fitness(genomes: list[Genome]) -> np.ndarray:
        n = len(genomes)
        size = genomes_per_call or n
        out = []
        for start in range(0, n, size):
            part = genomes[start : start + size]
            pad = (-len(part)) % devices  # every device takes as many genomes
            factors = np.asarray([g.factors for g in part] + [part[-1].factors] * pad, np.float32)
            n_hats = np.asarray([g.n_hat for g in part] + [part[-1].n_hat] * pad, np.int32)
            losses = _genome_losses(
                model.params, c, model.attention, tokens, counted, base_inv, jnp.asarray(factors),
                jnp.asarray(n_hats), factor, mesh,
            )  # fmt: skip
            out.append(np.asarray(losses)[: len(part)])
        return np.concatenate(out)

    return fitness


@partial(jax.jit, static_argnames=("config", "attention", "attention_factor", "mesh"))
def _genome_losses(
    params: dict,
    config: ModelConfig,
    attention: AttentionFn,
    tokens: jax.Array,
    counted: jax.Array,
    base_inv: jax.Array,
    factors: jax.Array,
    n_hats: jax.Array,
    attention_factor: float,
    mesh: Mesh | None,
) -> jax.Array:
    """Mean next-token loss per genome: factors float32 `[genomes, dims]`, n_hats int32 `[genomes]`."""
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    targets, valid = next_token_targets(tokens, lengths)
    valid &= jnp.concatenate([counted[:, 1:], jnp.zeros_like(counted[:, :1])], axis=1)
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]

    def one(xs):
        f, n_hat = xs
        transform = lambda pos: positions_lib.rescaled_rotary(pos, base_inv, f, n_hat, attention_factor)
        hidden, _ = forward(
            params, config, tokens, positions, jnp.zeros_like(lengths), lengths, None, "prefill", attention, transform
        )
        total, count = token_loss(hidden, head, targets, valid)
        return total / jnp.maximum(count, 1.0)

    def all_of(factors, n_hats):
        return jax.lax.map(one, (factors, n_hats))

    if mesh is None:
        return all_of(factors, n_hats)
    axes = tuple(mesh.axis_names)
    return jax.shard_map(
        all_of,
        mesh=mesh,
        in_specs=(PartitionSpec(axes), PartitionSpec(axes)),
        out_specs=PartitionSpec(axes),
        check_vma=False,
    )(factors, n_hats)


# what a LongRoPE factors file holds: everything `with_longrope` needs
FACTOR_KEYS = ("long_factor", "short_factor", "n_hat", "original_max_position_embeddings", "max_position_embeddings")


def write_factors(path: str | os.PathLike, config: ModelConfig, **extra) -> None:
    """`config`'s LongRoPE factors (a `with_longrope` config) as JSON, with `extra` keys (search results)."""
    rope = config.rope
    if rope.rope_type != "longrope":
        raise ValueError(f"the config's RoPE is {rope.rope_type!r}, not longrope.")
    record = dict(
        long_factor=list(rope.long_factor), short_factor=list(rope.short_factor), n_hat=rope.n_hat,
        original_max_position_embeddings=rope.original_max_position_embeddings,
        max_position_embeddings=config.max_position_embeddings, **extra,
    )  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))


# factors searched on the device for the built-in model, shipped with lcjax: name -> file (`read_factors` takes
# either); how each was searched is in its "searched" record
SHIPPED_FACTORS = {p.stem: p for p in sorted((Path(__file__).parent / "factors").glob("*.json"))}


def read_factors(path: str | os.PathLike) -> dict:
    """The `FACTOR_KEYS` of a file `write_factors` wrote, or of a `SHIPPED_FACTORS` name; ValueError naming the file
    when it is not one."""
    if str(path) in SHIPPED_FACTORS and not Path(path).exists():
        path = SHIPPED_FACTORS[str(path)]
    try:
        record = json.loads(Path(path).read_text())
        return {k: record[k] for k in FACTOR_KEYS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a LongRoPE factors file ({type(e).__name__}: {e}).") from None


def apply_factors(config: ModelConfig, factors: dict) -> ModelConfig:
    """`config` (plain RoPE, trained on the factors' original length) extended by `factors` (`read_factors`)."""
    if config.rope.rope_type != "default":
        raise ValueError(f"the model's RoPE is already scaled ({config.rope.rope_type!r}); LongRoPE factors apply to "
                         "plain RoPE.")  # fmt: skip
    if factors["original_max_position_embeddings"] != config.max_position_embeddings:
        raise ValueError(
            f"the factors extend a {factors['original_max_position_embeddings']}-token model; this one was trained "
            f"on {config.max_position_embeddings}."
        )
    return with_longrope(
        config, factors["long_factor"], factors["max_position_embeddings"], factors["short_factor"], factors["n_hat"]
    )
