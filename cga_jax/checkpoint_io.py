"""Checkpoint files: reading PyTorch / safetensors / npz state dicts, converted directories
(``model.safetensors`` and/or an Orbax ``orbax/``, plus ``config.json``), atomic writes.

Files are read with ``torch.load(weights_only=True)`` (no pickled code runs), safetensors or
numpy (no pickle). Every write goes to a temporary name in the target's directory and is renamed
at the end, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from cga_jax.errors import CheckpointError
from cga_jax.keymap import path_to_timm_key, undotted

FORMATS = ("safetensors", "orbax", "both")
ORBAX_DIR = "orbax"
SAFETENSORS_FILE = "model.safetensors"
META_FILE = "config.json"


# ---------------------------------------------------------------------------------------------
# PyTorch-side files
# ---------------------------------------------------------------------------------------------
def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    import torch  # lazily: only torch tensors get here

    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def unwrap_state_dict(obj, source: str = "<state dict>") -> dict:
    """Find the state dict inside a checkpoint object ({'model': sd}, {'state_dict': sd}, sd)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors) or {{'model': sd}}, "
            f"got {type(obj).__name__}"
        )
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(wrapper), Mapping):
            return unwrap_state_dict(obj[wrapper], source)
    if not obj:
        raise CheckpointError(f"{source}: the checkpoint holds an empty state dict")
    sd = dict(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_raw(path: str):
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception:  # bf16 has no numpy dtype: go through torch
            from safetensors.torch import load_file as load_torch

            return load_torch(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a checkpoint file into ``{key: np.ndarray}`` (its own layout) and a list of notes.

    ``.safetensors`` through safetensors; ``.npz`` through numpy (no pickle); anything else through
    ``torch.load(weights_only=True)``. fp16/bf16 tensors are cast to float32 (noted).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    try:
        raw = _load_raw(path)
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading PyTorch files needs torch: pip install 'cga_jax[torch]' ({e}); "
            "timm's copies of the release load without it: "
            "pretrained='hf-hub:timm/efficientvit_m0.r224_in1k' (m0...m5)"
        ) from e
    except Exception as e:  # noqa: BLE001 - turn every reader error into one clear message
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "Expected a PyTorch state dict saved with torch.save (loaded with weights_only=True, "
            "so files that need arbitrary pickled code are refused), a .safetensors or a .npz file."
        ) from e
    sd = unwrap_state_dict(raw, path)
    out: dict[str, np.ndarray] = {}
    low = set()
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: state dict key {k!r} is not a string")
        dtype = str(getattr(v, "dtype", "")).replace("torch.", "")
        if dtype in ("float16", "bfloat16"):
            low.add(dtype)
        arr = _to_numpy(v)
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        out[k] = arr
    notes = []
    if low:
        notes.append(
            f"{path}: weights stored as {', '.join(sorted(low))} were cast to float32 "
            "(their precision is what was stored)"
        )
    return out, notes


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def _writable_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{path}: cannot write there (the directory {parent} is missing or not writable); "
            "nothing was written"
        )
    return parent


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; nothing is left on error."""
    parent = _writable_parent(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="tmp-cga-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(os.fspath(path), write)


# ---------------------------------------------------------------------------------------------
# converted directories
# ---------------------------------------------------------------------------------------------
def save_orbax(flat: dict[str, np.ndarray], path: str) -> None:
    """Write ``{dotted path: array}`` as an Orbax checkpoint (a nested dict) at ``path``."""
    import orbax.checkpoint as ocp

    tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), tree)
        ckptr.wait_until_finished()


def load_orbax(path: str) -> dict[str, np.ndarray]:
    """An Orbax checkpoint written by :func:`save_orbax` -> ``{dotted path: np.ndarray}``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = dict(getattr(meta, "item_metadata", None) or meta)  # newer Orbax wraps the tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ckptr.restore(path, restore_args=as_numpy)
    flat = traverse_util.flatten_dict(restored)
    return {".".join(str(p) for p in k): np.asarray(v) for k, v in flat.items()}


def is_orbax_dir(path: str) -> bool:
    """Whether ``path`` is an Orbax checkpoint directory (it has Orbax's metadata files)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("_CHECKPOINT_METADATA", "_METADATA")
    )


def check_format(fmt: str) -> None:
    """``fmt`` must be one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def check_out_dir(out: str) -> None:
    """Fail before any work if ``out`` cannot become a directory: it exists as a file, or its
    nearest existing ancestor is not a writable directory (missing parents are created when
    the directory is written, as ``mkdir -p``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{out}: cannot write there ({ancestor} is not a writable directory); "
            "nothing was converted"
        )


def write_converted(out: str, flat: dict[str, np.ndarray], meta: dict, fmt: str) -> None:
    """Write a converted directory: ``flat`` (``{dotted Flax path: float32 array}``) as
    ``model.safetensors`` and/or ``orbax/`` (``fmt``), ``meta`` as ``config.json``. Built in a
    temporary directory next to ``out`` and renamed onto it (replacing an old ``out``)."""
    from safetensors.numpy import save_file

    check_format(fmt)
    check_out_dir(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".cga-convert-")
    try:
        if fmt in ("safetensors", "both"):
            save_file(flat, os.path.join(tmp, SAFETENSORS_FILE))
        if fmt in ("orbax", "both"):
            save_orbax(flat, os.path.join(tmp, ORBAX_DIR))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(directory: str | os.PathLike) -> dict:
    """``config.json`` of a converted directory ({} when there is none, e.g. a bare ``orbax/``)."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_converted(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """A converted directory (``model.safetensors`` and/or ``orbax/``; or an ``orbax/``
    directory itself) -> (timm-layout state dict, metadata)."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    st = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.exists(st):
        flat = load_file(st)
    elif is_orbax_dir(os.path.join(directory, ORBAX_DIR)):
        flat = load_orbax(os.path.join(directory, ORBAX_DIR))
    elif is_orbax_dir(directory):
        flat = load_orbax(directory)
    else:
        raise CheckpointError(
            f"{directory}: no {SAFETENSORS_FILE} nor an Orbax checkpoint ({ORBAX_DIR}/) in it"
        )
    sd = dict(path_to_timm_key(undotted(k), v) for k, v in flat.items())
    return sd, read_meta(directory)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """A checkpoint file (:func:`read_state_dict`) or a converted directory
    (:func:`read_converted`, timm layout) -> (state dict, notes)."""
    if os.path.isdir(path):
        return read_converted(path)[0], []
    return read_state_dict(path)
