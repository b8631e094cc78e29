"""Orbax checkpoints of the whole run: train state pytree + Grain iterator state + metadata.

Async saves, ``keep`` latest steps (``CheckpointManager``), plus a separate ``best/`` manager that
holds the best-accuracy step. Orbax writes into a temporary directory and renames it when
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
