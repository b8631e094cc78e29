"""Convert official / timm PyTorch checkpoints to a cga_jax checkpoint directory.

Output directory: ``model.safetensors`` (the Flax state, keys are dotted Flax paths, float32)
and/or ``orbax/`` (the same state as an Orbax checkpoint of a nested dict, keys = path parts;
``fmt='orbax'`` or ``'both'``), and ``config.json`` (model name, :class:`EfficientViTConfig` fields, source, notes, and the PyTorch
``num_batches_tracked`` values so that :func:`cga_jax.export_torch` gives the file back bitwise).
Everything is written to a temporary directory next to ``out`` and renamed at the end: on any
error nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

import numpy as np
from flax import nnx, traverse_util

from cga_jax.weights import CheckpointError

OFFICIAL_URL = (
    "https://github.com/xinyuliu-jeffrey/EfficientVit_Model_Zoo/releases/download/v1.0/{name}.pth"
)
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cga_jax")
FORMATS = ("safetensors", "orbax", "both")
ORBAX_DIR = "orbax"


def download(url: str, cache_dir: str = CACHE_DIR) -> str:
    """Fetch ``url`` into ``cache_dir`` once (atomically: temp file + rename); returns the path."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, name)
    if os.path.exists(dst):
        return dst
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url) as r:  # noqa: S310
            shutil.copyfileobj(r, f)
        os.replace(tmp, dst)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    return dst


def resolve_source(src: str, cache_dir: str = CACHE_DIR) -> str:
    """A local path for ``src``: a file, ``hf-hub:org/name`` (``model.safetensors`` through
    huggingface_hub), ``official:efficientvit_mN`` (the release URL) or an http(s)/file URL."""
    if src.startswith("hf-hub:"):
        repo = src[len("hf-hub:") :]
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo, "model.safetensors")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{src}: cannot get model.safetensors from the Hugging Face hub repository "
                f"{repo!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Check the name "
                "(e.g. hf-hub:timm/efficientvit_m0.r224_in1k) and your network/HF cache."
            ) from e
    if src.startswith("official:"):
        return download(OFFICIAL_URL.format(name=src[len("official:") :]), cache_dir)
    if src.startswith(("http://", "https://", "file://")):
        return download(src, cache_dir)
    return src


def _flax_flat(model: nnx.Module) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    flat = traverse_util.flatten_dict(pure)
    return {".".join(str(p) for p in k): np.asarray(v, np.float32) for k, v in flat.items()}


def _check_writable(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{out}: cannot write there (the parent directory {parent} is missing or not "
            "writable); nothing was converted"
        )
    return parent


def convert(
    model_name: str,
    src: str,
    out: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    cache_dir: str = CACHE_DIR,
    fmt: str = "safetensors",
) -> list[str]:
    """Convert ``src`` for ``model_name`` into the directory ``out``; returns notes.

    ``fmt``: ``'safetensors'`` (``model.safetensors``), ``'orbax'`` (``orbax/``) or ``'both'``.
    Raises :class:`CheckpointError` (one message naming every problem) and writes nothing.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    from cga_jax.loading import load_pretrained, state_dict_to_timm
    from cga_jax.registry import create_model, get_config
    from cga_jax.weights import read_state_dict

    try:
        get_config(model_name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    parent = _check_writable(out)
    path = resolve_source(src, cache_dir)
    sd, _ = read_state_dict(path)
    timm_sd, layout = state_dict_to_timm(sd)
    nbt = {k: int(v) for k, v in timm_sd.items() if k.endswith("num_batches_tracked")}
    head = timm_sd.get("head.linear.weight")
    from cga_jax.variants import guess_variant

    guess = guess_variant(timm_sd)
    base = model_name.partition(".")[0]
    if guess is not None and guess != base:
        raise CheckpointError(
            f"{path}: this checkpoint looks like {guess} (its shapes match {guess} exactly), not "
            f"{model_name}; pass --model {guess}"
        )
    try:
        model = create_model(model_name, num_classes=num_classes, img_size=img_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if (
        num_classes is None
        and head is not None
        and head.shape[0] != model.num_classes
        and (guess == base)
    ):
        raise CheckpointError(
            f"{path}: the checkpoint's classifier has {head.shape[0]} classes, {model_name} has "
            f"{model.num_classes}; pass --num-classes N to drop the classifier (fine-tuning)"
        )
    notes = load_pretrained(model, path, new_head=num_classes is not None)
    meta = {
        "model": model_name,
        "config": dataclasses.asdict(model.cfg),
        "source": src,
        "source_layout": layout,
        "num_batches_tracked": nbt,
        "notes": notes,
        "format": fmt,
    }
    from safetensors.numpy import save_file

    tmp = tempfile.mkdtemp(dir=parent, prefix=".cga-convert-")
    try:
        flat = _flax_flat(model)
        if fmt in ("safetensors", "both"):
            save_file(flat, os.path.join(tmp, "model.safetensors"))
        if fmt in ("orbax", "both"):
            save_orbax(flat, os.path.join(tmp, ORBAX_DIR))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def save_orbax(flat: dict[str, np.ndarray], path: str) -> None:
    """Write ``{dotted path: array}`` as an Orbax checkpoint (a nested dict) at ``path``."""
    import orbax.checkpoint as ocp

    tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), tree)
        ckptr.wait_until_finished()


def load_orbax(path: str) -> dict[str, np.ndarray]:
    """An Orbax checkpoint written by :func:`save_orbax` -> ``{dotted path: np.ndarray}``."""
    import jax
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


def read_converted(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """A converted directory (``model.safetensors`` and/or ``orbax/``; or an ``orbax/``
    directory itself) -> (timm-layout state dict, metadata)."""
    from safetensors.numpy import load_file

    from cga_jax.weights import path_to_timm_key

    meta_path = os.path.join(directory, "config.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    st = os.path.join(directory, "model.safetensors")
    if os.path.exists(st):
        flat = load_file(st)
    elif is_orbax_dir(os.path.join(directory, ORBAX_DIR)):
        flat = load_orbax(os.path.join(directory, ORBAX_DIR))
    elif is_orbax_dir(directory):
        flat = load_orbax(directory)
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors nor an Orbax checkpoint ({ORBAX_DIR}/) in it"
        )
    sd = {}
    for k, v in flat.items():
        path = tuple(int(p) if p.isdigit() else p for p in k.split("."))
        key, value = path_to_timm_key(path, v)
        sd[key] = value
    return sd, meta


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; nothing is left on error."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{path}: cannot write there (the directory {parent} is missing or "
            "not writable); nothing was written"
        )
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="tmp-cga-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
