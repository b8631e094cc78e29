"""Orbax checkpoints of the whole run: train state pytree + Grain iterator state + metadata.

:class:`Checkpoints` holds a run's two managers: async saves of the ``keep`` latest steps in
``workdir/checkpoints`` and the best-accuracy step in ``workdir/best``. Orbax writes into a temporary directory and renames it when
complete, so a kill during a write leaves the previous step as the latest restorable one.

The data iterator state is per process (each reads its own shard): Grain's Orbax handler writes
``data/process_<i>-of-<n>.json`` for every process.
"""

from __future__ import annotations

import os
import warnings

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class _IteratorState:
    """Holds iterator-state bytes for Grain's handler. The state is captured when ``save`` is
    called: an async save may run the handler later, when the live iterator has moved on."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by Grain's restore
        pass


def make_manager(directory: str, keep: int, name: str = "run") -> ocp.CheckpointManager:
    """``name`` keys the cross-process barriers: two managers saving the same step at once (the
    latest and the best) would otherwise collide on multi-host runs."""
    opts = ocp.CheckpointManagerOptions(
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # leftovers of a write killed half-way
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: bytes | None, meta: dict):
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_state is not None:
        args["data"] = grain.PyGrainCheckpointSave(_IteratorState(data_state))
    mngr.save(step, args=ocp.args.Composite(**args), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, like_state):
    """-> (state with ``like_state``'s shardings, this process's data iterator state bytes or
    None, meta)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    args = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    data_dir = epath.Path(mngr.directory) / str(step) / "data"
    mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    holder = _IteratorState()
    if mine.exists():
        args["data"] = grain.PyGrainCheckpointRestore(holder)
    elif data_dir.is_dir():
        warnings.warn(
            f"{data_dir} holds no data-iterator state for process {jax.process_index()} of "
            f"{jax.process_count()} (was the run saved with another process count?): the model "
            "and optimiser resume, the data order starts afresh",
            stacklevel=2,
        )
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], holder.state, out["meta"]


class Checkpoints:
    """A run's checkpoints: the latest ``keep`` steps (``checkpoints/``, with the data-iterator
    state and ``{"step", "best"}``) and the step of the best validation top-1 (``best/``)."""

    def __init__(self, workdir: str, keep: int):
        self.latest = make_manager(os.path.join(workdir, "checkpoints"), keep)
        self.best = make_manager(os.path.join(workdir, "best"), 1, name="best")

    @property
    def directory(self) -> str:
        return str(self.latest.directory)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, like_state):
        """-> (state, data-iterator state bytes or None, step, best top-1) of the latest
        checkpoint, or None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        state, data_state, meta = restore(self.latest, step, like_state)
        return state, data_state, int(meta["step"]), float(meta["best"])

    def save(self, step: int, state, data_state: bytes, best: float) -> None:
        save(self.latest, step, state, data_state, {"step": step, "best": best})

    def save_best(self, step: int, state, top1: float) -> None:
        save(self.best, step, state, None, {"step": step, "val_top1": top1})

    def wait(self) -> None:
        """Block until every async save has been committed."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
