"""Orbax checkpoints of the whole run: train state pytree + Grain iterator state + metadata.

Async saves, ``keep`` latest steps (``CheckpointManager``), plus a separate ``best/`` manager that
holds the best-accuracy step. Orbax writes into a temporary directory and renames it when
complete, so a kill during a write leaves the previous step as the latest restorable one.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath


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
        args["data"] = ocp.args.JsonSave(json.loads(data_state.decode()))
    mngr.save(step, args=ocp.args.Composite(**args), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, like_state):
    """-> (state with ``like_state``'s shardings, data iterator state bytes or None, meta)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    args = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    # ``item_metadata`` reports JSON items as None without a handler registry, so look on disk
    # (this check once hid the data state: resumed runs restarted the data stream from zero).
    has_data = (epath.Path(mngr.directory) / str(step) / "data").is_dir()
    if has_data:
        args["data"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    data = json.dumps(out["data"]).encode() if has_data else None
    return out["state"], data, out["meta"]
