"""Reads safetensors checkpoints one tensor at a time through a memory map.

A small reader of the format (8-byte header size, JSON header, raw little-endian data) rather than the
`safetensors` package's numpy loader, because that loader cannot return bfloat16 (numpy has no such
dtype; `ml_dtypes` does) and we want each tensor as a zero-copy view of the mapped file, so peak host
memory is one tensor's converted copy, never a shard or a model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the model config."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Returns (tensor entries of the JSON header, byte offset where data starts)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}; "
                "the file is truncated or not safetensors."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}).") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensors need {data_start + end} bytes but the file has {size}; it is truncated "
            "(re-download or re-save it)."
        )
    return header, data_start


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for each tensor in file order; arrays are read-only views of a memory map."""
    header, data_start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which lcjax cannot "
                f"read; supported: {', '.join(_DTYPES)}."
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes but shape {shape} of "
                f"{entry['dtype']} needs {expected}."
            )
        yield name, mm[data_start + begin : data_start + end].view(dtype).reshape(shape)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a transformers checkpoint directory, checked to exist.

    Uses `model.safetensors.index.json` when present (every shard it names must exist), else
    `model.safetensors`, else every `*.safetensors` file.
    """
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from e
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}.")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json).")
    return files


def iter_checkpoint(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Yields (tensor name, array, file) across all shards of a checkpoint directory, one at a time."""
    for path in checkpoint_files(directory):
        for name, array in iter_tensors(path):
            yield name, array, path
