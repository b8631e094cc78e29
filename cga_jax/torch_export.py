"""cga_jax model -> PyTorch state dict, official (Cream) or timm layout, in PyTorch's key order."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from cga_jax.attention import CascadedGroupAttention, attention_bias_index
from cga_jax.keymap import dotted, timm_to_official, to_timm_state_dict, torch_order

LAYOUTS = ("official", "timm")


def _torch_buffers(
    model: nnx.Module,
    timm_sd: Mapping[str, np.ndarray],
    layout: str,
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict[str, np.ndarray]:
    """The integer buffers the PyTorch model keeps in its state dict and cga_jax does not (timm
    keys, int64): every BatchNorm's ``num_batches_tracked`` (``num_batches_tracked``: one value
    for all, or a mapping by timm key such as ``cga-jax convert`` saves) and, for the official
    layout only, each attention's ``attention_bias_idxs`` (timm does not persist it).
    ``timm_sd``: the model's :func:`~cga_jax.keymap.to_timm_state_dict`."""
    out: dict[str, np.ndarray] = {}
    if layout == "official":
        for path, m in nnx.iter_modules(model):
            if isinstance(m, CascadedGroupAttention):
                idxs = attention_bias_index(m.resolution).astype(np.int64)
                out[f"{dotted(path)}.attention_bias_idxs"] = idxs
    for key in timm_sd:
        if key.endswith(".running_mean"):
            nbt = key[: -len("running_mean")] + "num_batches_tracked"
            if isinstance(num_batches_tracked, Mapping):
                value = num_batches_tracked.get(nbt, 0)
            else:
                value = num_batches_tracked
            out[nbt] = np.array(value, dtype=np.int64)
    return out


def export_state_dict(
    model: nnx.Module,
    layout: str = "official",
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict[str, np.ndarray]:
    """Like :func:`export_torch` but numpy arrays (no torch needed)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'official' or 'timm', got {layout!r}")
    if not list(nnx.state(model, nnx.BatchStat)):
        raise ValueError("export_torch: the model has no BatchNorm statistics (a fused model?)")
    sd = to_timm_state_dict(model)
    sd.update(_torch_buffers(model, sd, layout, num_batches_tracked))
    sd = {k: sd[k] for k in torch_order(sd)}
    return timm_to_official(sd) if layout == "official" else sd


def export_torch(
    model: nnx.Module,
    layout: str = "official",
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict:
    """The model as a PyTorch state dict ``{key: torch.Tensor}`` that loads with ``strict=True``
    into the official model (``layout='official'``: the released files wrap it as
    ``{'model': sd}``) or into timm's ``efficientvit_msra`` (``layout='timm'``), with the keys,
    shapes, dtypes and order of their own state dicts (the integer buffers: see
    ``_torch_buffers``). Needs torch.

    Raises ValueError on a BN-folded model (no BatchNorm left to export).
    """
    import torch

    sd = export_state_dict(model, layout, num_batches_tracked)
    return {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in sd.items()}
