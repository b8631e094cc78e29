"""Convert official / timm PyTorch checkpoints to a cga_jax checkpoint directory.

Output directory: ``model.safetensors`` (the Flax state, keys are dotted Flax paths, float32) and
``config.json`` (model name, :class:`EfficientViTConfig` fields, source, notes, and the PyTorch
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
) -> list[str]:
    """Convert ``src`` for ``model_name`` into the directory ``out``; returns notes.

    Raises :class:`CheckpointError` (one message naming every problem) and writes nothing.
    """
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
    }
    from safetensors.numpy import save_file

    tmp = tempfile.mkdtemp(dir=parent, prefix=".cga-convert-")
    try:
        save_file(_flax_flat(model), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def read_converted(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """A converted directory -> (timm-layout state dict, metadata)."""
    from safetensors.numpy import load_file

    from cga_jax.weights import path_to_timm_key

    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    flat = load_file(os.path.join(directory, "model.safetensors"))
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
