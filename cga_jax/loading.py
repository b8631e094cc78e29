"""Load weights into a model: from a state dict in memory, a file, a converted directory, a URL
or a hub name; and recognise which registered variant a state dict belongs to."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from cga_jax.attention import attention_bias_index
from cga_jax.checkpoint_io import read_weights
from cga_jax.config import VARIANTS
from cga_jax.download import resolve_source
from cga_jax.errors import CheckpointError
from cga_jax.keymap import (
    TORCH_ONLY_LEAVES,
    Path,
    detect_layout,
    dotted,
    flat_state,
    official_to_timm,
    path_to_timm_shape,
    timm_key_to_path,
    to_flax_layout,
)
from cga_jax.model import EfficientViT
from cga_jax.resize import resize_attention_biases

_SHOWN = 25  # problems listed per kind in an error message


def state_dict_to_timm(sd: Mapping[str, np.ndarray]) -> tuple[dict, str]:
    """Any supported layout -> timm layout; returns (state dict, detected layout)."""
    layout = detect_layout(sd.keys())
    if layout == "official":
        return official_to_timm(sd), layout
    return dict(sd), layout


def _check_bias_idxs(sd: Mapping[str, np.ndarray], problems: list[str]) -> None:
    for k, v in sd.items():
        if k.endswith("attention_bias_idxs"):
            r = int(round(np.sqrt(v.shape[0])))
            if v.shape != (r * r, r * r) or not np.array_equal(v, attention_bias_index(r)):
                problems.append(f"{k}: attention_bias_idxs differs from the standard offset index")


def load_timm_state_dict(
    model: nnx.Module,
    sd: Mapping[str, np.ndarray],
    *,
    skip_prefixes: tuple[str, ...] = (),
    source: str = "<state dict>",
) -> list[str]:
    """Copy a timm-layout state dict into ``model`` in place, strictly.

    Every problem (missing, unexpected, mis-shaped key) is collected and raised together as a
    :class:`CheckpointError`; on error the model is not modified. Keys starting with one of
    ``skip_prefixes`` (e.g. ``'head.linear'`` for a new classifier) are ignored on both sides.
    Attention-bias tables of another window resolution are resized (bicubic). Returns notes.
    """
    target = flat_state(model)
    filled: dict[Path, np.ndarray] = {}
    missing, unexpected, mismatched, problems, notes = [], [], [], [], []
    _check_bias_idxs(sd, problems)

    def skipped(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in skip_prefixes)

    for key, value in sd.items():
        if skipped(key):
            continue
        mapped = timm_key_to_path(key)
        if mapped is None:
            continue
        path, transform = mapped
        if path not in target or transform == "unknown":
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        value = to_flax_layout(np.asarray(value), transform)
        want = tuple(target[path].shape)
        if path[-1] == "attention_biases" and value.shape != want and value.shape[0] == want[0]:
            resized = resize_attention_biases(value, want[1])
            if resized is not None:
                notes.append(
                    f"{key}: attention-bias table resized {value.shape} -> {want} (bicubic)"
                )
                value = resized
        if tuple(value.shape) != want:
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {want} (Flax layout)"
            )
            continue
        filled[path] = value
    for path, leaf in target.items():
        if path not in filled and not skipped(path_to_timm_shape(path, leaf.shape)[0]):
            missing.append(dotted(path))
    if missing or unexpected or mismatched or problems:
        lines = [f"{source}: the checkpoint does not fit this model"]
        for title, items in (
            ("missing in the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", mismatched),
            ("other problems", problems),
        ):
            if items:
                more = [f"... and {len(items) - _SHOWN} more"] if len(items) > _SHOWN else []
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:_SHOWN] + more))
        raise CheckpointError("\n".join(lines))
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for path, value in filled.items():
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
    return notes


def load_state_dict(
    model: nnx.Module, sd: Mapping[str, np.ndarray], *, new_head: bool = False, source: str = ""
) -> list[str]:
    """Load a state dict of any supported layout into ``model`` in place (strict). With
    ``new_head``, a classifier whose size differs from the model's is dropped and the model's
    fresh one kept. A checkpoint of another variant is named in the error. Returns notes."""
    source = source or "<state dict>"
    sd, _ = state_dict_to_timm(sd)
    skip: tuple[str, ...] = ()
    notes = []
    if new_head:
        for head in ("head", "head_dist"):
            w = sd.get(f"{head}.linear.weight")
            if w is not None and w.shape[0] != model.num_classes:
                skip += (f"{head}.linear",)
                notes.append(
                    f"{source}: {head}.linear has {w.shape[0]} classes, the model "
                    f"{model.num_classes}: classifier left at its fresh initialisation"
                )
    try:
        notes += load_timm_state_dict(model, sd, skip_prefixes=skip, source=source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_variant_hint(model, sd)}") from None
    return notes


def load_pretrained(
    model: nnx.Module, source: str | os.PathLike, *, new_head: bool = False
) -> list[str]:
    """Load ``source`` into ``model`` in place (strict; ``new_head`` as in
    :func:`load_state_dict`). ``source``: a checkpoint file (official or timm ``.pth``,
    ``.safetensors``, ``.npz``), a ``cga-jax convert`` directory (or its ``orbax/``), a URL,
    ``official:<model>`` or ``hf-hub:<org>/<name>`` (downloaded once: :mod:`cga_jax.download`).
    Returns notes."""
    path = resolve_source(source)
    sd, notes = read_weights(path)
    return notes + load_state_dict(model, sd, new_head=new_head, source=path)


# ---------------------------------------------------------------------------------------------
# which variant is this?
# ---------------------------------------------------------------------------------------------
@functools.cache
def _signature(name: str) -> frozenset:
    cfg = VARIANTS[name].replace(num_classes=0)
    model = nnx.eval_shape(lambda: EfficientViT(cfg, rngs=nnx.Rngs(0)))
    return frozenset(path_to_timm_shape(p, v.shape) for p, v in flat_state(model).items())


def guess_variant(sd: Mapping[str, np.ndarray]) -> str | None:
    """The registered variant whose backbone (everything but the head) matches the shapes of
    ``sd`` (timm layout)."""
    have = frozenset(
        (k, tuple(np.shape(v)))
        for k, v in sd.items()
        if not k.startswith("head") and k.rpartition(".")[2] not in TORCH_ONLY_LEAVES
    )
    for name in VARIANTS:
        if _signature(name) == have:
            return name
    return None


def _variant_hint(model: nnx.Module, sd: Mapping[str, np.ndarray]) -> str:
    guess = guess_variant(sd)
    if guess is None:
        return ""
    embed_dim = getattr(getattr(model, "cfg", None), "embed_dim", "?")
    return (
        f"\n  the checkpoint looks like {guess} (model built from embed_dim={embed_dim}); "
        "pass the matching model name"
    )
