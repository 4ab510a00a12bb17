"""Training checkpoints through orbax's `CheckpointManager`: the whole `TrainState` (parameters, optimiser state,
step) and a small JSON record (the data position and whatever else a run needs to continue), every `every` steps,
the newest `keep` kept, written asynchronously so the next steps overlap the write. A run restored from one
continues exactly where it stopped: the step index fixes the data (`lcjax.train.data.Batches`) and the state
fixes everything else.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lcjax.train.step import TrainState


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be restored from."""


class Checkpoints:
    """The checkpoints of one run in `directory` (created if missing). Close it (or use `with`) so the last
    asynchronous write finishes."""

    def __init__(self, directory: str | os.PathLike, every: int = 100, keep: int = 3):
        if every < 1 or keep < 1:
            raise ValueError(f"every and keep must be >= 1, got {every} and {keep}.")
        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, step: int, state: TrainState, record: dict, force: bool = False) -> bool:
        """Saves `state` and the JSON-able `record` as step `step` when it is a saving step (or `force`); returns
        whether it did."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        return self.manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state and record saved at `step` (default: the latest), placed with `like`'s shapes, dtypes and
        shardings. Raises `CheckpointError` naming the directory when there is none or it cannot be read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory} holds no checkpoint to resume from.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # orbax reports a damaged checkpoint as whatever its readers raise first
            raise CheckpointError(
                f"{self.directory}: step {step} cannot be restored ({type(e).__name__}: {str(e)[:200]}); the "
                "directory is damaged or from another model: remove it, or point the run elsewhere."
            ) from e
        return restored.state, restored.record

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
