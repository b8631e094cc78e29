"""State-dict keys: official (Cream) <-> timm <-> Flax paths, and the layout transposes.

The Flax module tree mirrors timm's, so a timm key becomes a Flax path by renaming its leaf and
transposing conv / linear kernels (PyTorch OIHW / (out, in) -> Flax HWIO / (in, out)). The
official layout differs from timm's in module names only (:func:`official_to_timm`,
:func:`timm_to_official`). Nothing here reads files or builds models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx, traverse_util

from cga_jax.errors import CheckpointError

Path = tuple  # a Flax state path, e.g. ('stages', 0, 'blocks', 1, 'mixer', 'm', 'attn', ...)

# PyTorch buffers that carry no state in cga_jax (rebuilt on export: cga_jax.torch_export)
TORCH_ONLY_LEAVES = ("num_batches_tracked", "attention_bias_idxs")


# ---------------------------------------------------------------------------------------------
# official <-> timm
# ---------------------------------------------------------------------------------------------
def detect_layout(keys) -> str:
    """'official' (Cream: ``blocks1.0...``, ``.c.``) or 'timm' (``stages.0...``)."""
    keys = list(keys)
    if any(k.startswith("stages.") for k in keys):
        return "timm"
    if any(re.match(r"blocks\d+\.", k) for k in keys) or any(".c.weight" in k for k in keys):
        return "official"
    sample = ", ".join(keys[:5])
    raise CheckpointError(
        "cannot tell the checkpoint layout: no 'stages.*' (timm) nor 'blocks<N>.*' (official) keys "
        f"- is this an EfficientViT (MSRA) checkpoint? first keys: {sample}"
    )


_PE_OFFICIAL = {"0": "conv1", "2": "conv2", "4": "conv3", "6": "conv4"}
_PE_TIMM = {v: k for k, v in _PE_OFFICIAL.items()}
_DOWN_OFFICIAL = {"0": "res1", "1": "patchmerge", "2": "res2"}
_DOWN_TIMM = {v: k for k, v in _DOWN_OFFICIAL.items()}
# Conv2d_BN.c <-> ConvNorm.conv; BN_Linear.l <-> NormLinear.linear (the module before the leaf)
_LEAF_OFFICIAL = {"c": "conv", "l": "linear"}
_LEAF_TIMM = {v: k for k, v in _LEAF_OFFICIAL.items()}


def _rename_parent(rest: list[str], table: Mapping[str, str]) -> list[str]:
    if len(rest) >= 2 and rest[-2] in table:
        return [*rest[:-2], table[rest[-2]], rest[-1]]
    return list(rest)


def official_to_timm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename official (Cream) keys to timm's. Stage ``s`` subsamples iff ``blocks<s>.1.conv1``
    (a PatchMerging) exists. Unknown keys are kept as they are (reported later as unexpected)."""
    sub = {int(m.group(1)) for k in sd if (m := re.match(r"blocks(\d+)\.1\.conv1\.", k))}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in _PE_OFFICIAL:
            rest = _rename_parent(parts[2:], _LEAF_OFFICIAL)
            parts = ["patch_embed", _PE_OFFICIAL[parts[1]], *rest]
        elif (m := re.fullmatch(r"blocks(\d+)", parts[0])) and len(parts) > 2:
            s, j = int(m.group(1)), int(parts[1])
            rest = _rename_parent(parts[2:], _LEAF_OFFICIAL)
            prefix = ["stages", str(s - 1)]
            if s in sub and j < 3:
                parts = [*prefix, "downsample", _DOWN_OFFICIAL[str(j)], *rest]
            else:
                parts = [*prefix, "blocks", str(j - 3 if s in sub else j), *rest]
        elif parts[0] in ("head", "head_dist"):
            parts = [parts[0], *_rename_parent(parts[1:], _LEAF_OFFICIAL)]
        out[".".join(parts)] = v
    return out


def timm_to_official(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`official_to_timm` (the order of ``sd`` is kept)."""
    sub = {int(m.group(1)) for k in sd if (m := re.match(r"stages\.(\d+)\.downsample\.", k))}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in _PE_TIMM:
            parts = ["patch_embed", _PE_TIMM[parts[1]], *_rename_parent(parts[2:], _LEAF_TIMM)]
        elif parts[0] == "stages" and len(parts) > 3:
            i = int(parts[1])
            rest = _rename_parent(parts[4:], _LEAF_TIMM)
            if parts[2] == "downsample":
                parts = [f"blocks{i + 1}", _DOWN_TIMM[parts[3]], *rest]
            else:  # blocks
                parts = [f"blocks{i + 1}", str(int(parts[3]) + (3 if i in sub else 0)), *rest]
        elif parts[0] in ("head", "head_dist"):
            parts = [parts[0], *_rename_parent(parts[1:], _LEAF_TIMM)]
        out[".".join(parts)] = v
    return out


# ---------------------------------------------------------------------------------------------
# timm key <-> Flax path
# ---------------------------------------------------------------------------------------------
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_LEAVES_INV = {v: k for k, v in _BN_LEAVES.items()}
_CONV_TO_FLAX = (2, 3, 1, 0)  # OIHW -> HWIO
_CONV_TO_TORCH = (3, 2, 0, 1)  # HWIO -> OIHW


def timm_key_to_path(key: str) -> tuple[Path, str] | None:
    """``'stages.0.blocks.0.mixer.m.attn.qkvs.1.conv.weight'`` -> (path, transform), where
    transform is 'conv' (OIHW->HWIO), 'linear' ((out,in)->(in,out)), 'none' or 'unknown' (a key
    no cga_jax module has). None for the buffers of :data:`TORCH_ONLY_LEAVES`."""
    parts = key.split(".")
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in TORCH_ONLY_LEAVES:
        return None
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    if parent == "bn" and leaf in _BN_LEAVES:
        return (*path, _BN_LEAVES[leaf]), "none"
    if leaf == "weight" and parent in ("conv", "fc1", "fc2"):
        return (*path, "kernel"), "conv"
    if leaf == "weight" and parent == "linear":
        return (*path, "kernel"), "linear"
    if leaf == "bias" and parent in ("fc1", "fc2", "linear"):
        return (*path, "bias"), "none"
    if leaf == "attention_biases":
        return (*path, "attention_biases"), "none"
    return (*path, leaf), "unknown"


def to_flax_layout(value: np.ndarray, transform: str) -> np.ndarray:
    """A PyTorch-layout value -> Flax layout (``transform`` from :func:`timm_key_to_path`)."""
    if transform == "conv":
        return value.transpose(_CONV_TO_FLAX)
    if transform == "linear":
        return value.T
    return value


def _timm_leaf(path: Path, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """timm key of a Flax path and the axis permutation to PyTorch layout (None: as is)."""
    *mods, leaf = (str(p) for p in path)
    if mods and mods[-1] == "bn" and leaf in _BN_LEAVES_INV:
        return ".".join([*mods, _BN_LEAVES_INV[leaf]]), None
    if leaf == "kernel" and ndim == 4:
        return ".".join([*mods, "weight"]), _CONV_TO_TORCH
    if leaf == "kernel" and ndim == 2:
        return ".".join([*mods, "weight"]), (1, 0)
    return ".".join([*mods, leaf]), None


def path_to_timm_key(path: Path, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax path + value -> timm key + PyTorch-layout value (inverse of :func:`timm_key_to_path`)."""
    key, perm = _timm_leaf(path, np.ndim(value))
    if perm is None:
        return key, value
    return key, np.ascontiguousarray(np.transpose(value, perm))


def path_to_timm_shape(path: Path, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Like :func:`path_to_timm_key` for a shape (no array needed)."""
    key, perm = _timm_leaf(path, len(shape))
    return key, tuple(shape) if perm is None else tuple(shape[i] for i in perm)


def dotted(path: Path) -> str:
    """``('stages', 0, 'blocks')`` -> ``'stages.0.blocks'`` (the keys of a converted file)."""
    return ".".join(str(p) for p in path)


def undotted(key: str) -> Path:
    """Inverse of :func:`dotted`: digit parts become ints (list indices of the module tree)."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


# PyTorch's state_dict order: a module's own parameters, then its buffers, then its children in
# the order its __init__ registers them. Rank of each name among its siblings (both layouts).
_TORCH_RANK = {
    **{"patch_embed": 0, "stages": 1, "head": 2, "head_dist": 3},  # EfficientViT
    **{"downsample": 0, "blocks": 1, "res1": 0, "patchmerge": 1, "res2": 2},  # a stage
    **{"dw0": 0, "ffn0": 1, "mixer": 2, "dw1": 3, "ffn1": 4, "pw1": 0, "pw2": 1},  # a block
    **{"conv1": 0, "conv2": 1, "se": 1.5, "conv3": 2, "conv4": 3, "fc1": 0, "fc2": 1},
    **{"attention_biases": -2, "attention_bias_idxs": -1, "qkvs": 0, "dws": 1, "proj": 2},
    **{"conv": 0, "c": 0, "bn": 1, "linear": 2, "l": 2},  # ConvNorm / NormLinear
    **{"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4},
}


def torch_order(keys) -> list[str]:
    """``keys`` (timm layout) in the order PyTorch's ``state_dict()`` lists them (timm's
    ``efficientvit_msra``; renamed by :func:`timm_to_official`, the official order)."""

    def rank(key: str) -> tuple:
        return tuple(
            (int(p), "") if p.isdigit() else (_TORCH_RANK.get(p, 99), p) for p in key.split(".")
        )

    return sorted(keys, key=rank)


# ---------------------------------------------------------------------------------------------
# model state
# ---------------------------------------------------------------------------------------------
def flat_state(model: nnx.Module) -> dict[Path, object]:
    """The model's parameters and BN statistics as ``{Flax path: array}`` (the arrays as stored)."""
    pure = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return traverse_util.flatten_dict(pure)


def to_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters and BN statistics as a timm-layout state dict (numpy, float32)."""
    out = {}
    for path, value in flat_state(model).items():
        key, v = path_to_timm_key(path, np.asarray(value, np.float32))
        out[key] = v
    return out
