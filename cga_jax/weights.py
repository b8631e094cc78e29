"""PyTorch state dicts (official Cream layout or timm layout) <-> cga_jax state.

The Flax module tree mirrors timm's, so a timm key becomes a Flax path by renaming its leaf and
transposing the layout. The official layout differs from timm's in module names only; the
rename is :func:`official_to_timm` (and back, :func:`timm_to_official`).

Files are read with ``torch.load(weights_only=True)`` (no pickled code runs) or safetensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from cga_jax.attention import attention_bias_index

Path = tuple  # a Flax state path, e.g. ('stages', 0, 'blocks', 1, 'mixer', 'm', 'attn', ...)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names every problem found."""


# ---------------------------------------------------------------------------------------------
# reading files
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


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a PyTorch checkpoint file into ``{key: np.ndarray}`` and a list of notes.

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
    notes: list[str] = []
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                raw = load_file(path)
            except Exception:  # bf16 has no numpy dtype: go through torch
                from safetensors.torch import load_file as load_torch

                raw = load_torch(path)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        else:
            import torch

            raw = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading PyTorch files needs torch: pip install 'cga_jax[torch]' ({e})"
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
    if low:
        notes.append(
            f"{path}: weights stored as {', '.join(sorted(low))} were cast to float32 "
            "(their precision is what was stored)"
        )
    return out, notes


# ---------------------------------------------------------------------------------------------
# layouts
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


def _rename_leaf_official_to_timm(rest: list[str]) -> list[str]:
    # Conv2d_BN.c -> ConvNorm.conv; BN_Linear.l -> NormLinear.linear
    out = list(rest)
    if len(out) >= 2 and out[-2] == "c":
        out[-2] = "conv"
    if len(out) >= 2 and out[-2] == "l":
        out[-2] = "linear"
    return out


def _rename_leaf_timm_to_official(rest: list[str]) -> list[str]:
    out = list(rest)
    if len(out) >= 2 and out[-2] == "conv":
        out[-2] = "c"
    if len(out) >= 2 and out[-2] == "linear":
        out[-2] = "l"
    return out


def official_to_timm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename official (Cream) keys to timm's. Stage ``s`` subsamples iff ``blocks<s>.1.conv1``
    (a PatchMerging) exists. Unknown keys are kept as they are (reported later as unexpected)."""
    sub = {int(m.group(1)) for k in sd if (m := re.match(r"blocks(\d+)\.1\.conv1\.", k))}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in _PE_OFFICIAL:
            parts = [
                "patch_embed",
                _PE_OFFICIAL[parts[1]],
                *_rename_leaf_official_to_timm(parts[2:]),
            ]
        elif (m := re.fullmatch(r"blocks(\d+)", parts[0])) and len(parts) > 2:
            s = int(m.group(1))
            j = int(parts[1])
            rest = _rename_leaf_official_to_timm(parts[2:])
            prefix = ["stages", str(s - 1)]
            if s in sub and j < 3:
                if j == 1:
                    parts = [*prefix, "downsample", "patchmerge", *rest]
                else:
                    parts = [*prefix, "downsample", _DOWN_OFFICIAL[str(j)], *rest]
            else:
                parts = [*prefix, "blocks", str(j - 3 if s in sub else j), *rest]
        elif parts[0] in ("head", "head_dist"):
            parts = [parts[0], *_rename_leaf_official_to_timm(parts[1:])]
        out[".".join(parts)] = v
    return out


def timm_to_official(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`official_to_timm`."""
    sub = {int(m.group(1)) for k in sd if (m := re.match(r"stages\.(\d+)\.downsample\.", k))}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in _PE_TIMM:
            parts = ["patch_embed", _PE_TIMM[parts[1]], *_rename_leaf_timm_to_official(parts[2:])]
        elif parts[0] == "stages" and len(parts) > 3:
            i = int(parts[1])
            head = f"blocks{i + 1}"
            if parts[2] == "downsample":
                rest = _rename_leaf_timm_to_official(parts[4:])
                parts = [head, _DOWN_TIMM[parts[3]], *rest]
            else:  # blocks
                j = int(parts[3]) + (3 if i in sub else 0)
                parts = [head, str(j), *_rename_leaf_timm_to_official(parts[4:])]
        elif parts[0] in ("head", "head_dist"):
            parts = [parts[0], *_rename_leaf_timm_to_official(parts[1:])]
        out[".".join(parts)] = v
    return out


# ---------------------------------------------------------------------------------------------
# timm key <-> Flax path
# ---------------------------------------------------------------------------------------------
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_LEAVES_INV = {v: k for k, v in _BN_LEAVES.items()}
_SKIP_LEAVES = ("num_batches_tracked", "attention_bias_idxs")


def timm_key_to_path(key: str) -> tuple[Path, str] | None:
    """``'stages.0.blocks.0.mixer.m.attn.qkvs.1.conv.weight'`` -> (path, transform), where
    transform is one of 'conv' (OIHW->HWIO), 'linear' ((out,in)->(in,out)) or 'none'.
    Returns None for buffers that carry no state here (``num_batches_tracked``, bias indices)."""
    parts = key.split(".")
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in _SKIP_LEAVES:
        return None
    path = [int(p) if p.isdigit() else p for p in parts[:-1]]
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


def path_to_timm_key(path: Path, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax path + value -> timm key + PyTorch-layout value (inverse of :func:`timm_key_to_path`)."""
    *mods, leaf = [str(p) for p in path]
    parent = mods[-1] if mods else ""
    if parent == "bn" and leaf in _BN_LEAVES_INV:
        return ".".join([*mods, _BN_LEAVES_INV[leaf]]), value
    if leaf == "kernel" and value.ndim == 4:
        return ".".join([*mods, "weight"]), np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:
        return ".".join([*mods, "weight"]), np.ascontiguousarray(value.T)
    return ".".join([*mods, leaf]), value


def to_flax_layout(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        return value.transpose(2, 3, 1, 0)
    if transform == "linear":
        return value.T
    return value


def _flat_state(model: nnx.Module) -> dict[Path, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return traverse_util.flatten_dict(pure)


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
    strict: bool = True,
    skip_prefixes: tuple[str, ...] = (),
    source: str = "<state dict>",
) -> list[str]:
    """Copy a timm-layout state dict into ``model`` in place.

    Every problem (missing, unexpected, mis-shaped key) is collected and raised together as a
    :class:`CheckpointError`; on error the model is not modified. Keys starting with one of
    ``skip_prefixes`` (e.g. ``'head.linear'`` for a new classifier) are ignored on both sides.
    Returns notes (e.g. resized attention-bias tables).
    """
    from cga_jax.resize import resize_attention_biases  # local: avoids an import cycle

    target = _flat_state(model)
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
        filled[path] = value.astype(np.float32)
    for path in target:
        name = ".".join(str(p) for p in path)
        if path not in filled and not skipped(path_to_timm_key(path, np.zeros((1,)))[0]):
            missing.append(name)
    if (strict and (missing or unexpected)) or mismatched or problems:
        lines = [f"{source}: the checkpoint does not fit this model"]
        for title, items in (
            ("missing in the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", mismatched),
            ("other problems", problems),
        ):
            if items:
                shown = items[:25] + (
                    [f"... and {len(items) - 25} more"] if len(items) > 25 else []
                )
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)
    flat = traverse_util.flatten_dict(pure)
    for path, value in filled.items():
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
    return notes


def to_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters and BN statistics as a timm-layout state dict (numpy, float32)."""
    out = {}
    for path, value in _flat_state(model).items():
        key, v = path_to_timm_key(path, np.asarray(value))
        out[key] = v
    return out
