"""cga_jax model -> PyTorch state dict (official Cream layout or timm layout)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from cga_jax.weights import timm_to_official, to_timm_state_dict


def buffers_for(model: nnx.Module, num_batches_tracked: int | Mapping[str, int] = 0) -> dict:
    """The integer buffers PyTorch keeps and cga_jax does not, timm layout, as numpy int64:
    ``*.bn.num_batches_tracked`` (from ``num_batches_tracked``: one value for all, or a mapping
    by timm key, e.g. the values saved by ``cga-jax convert``) and ``attention_bias_idxs``."""
    from cga_jax.attention import CascadedGroupAttention, attention_bias_index

    out: dict[str, np.ndarray] = {}
    for path, m in nnx.iter_modules(model):
        name = ".".join(str(p) for p in path)
        if isinstance(m, CascadedGroupAttention):
            out[f"{name}.attention_bias_idxs"] = attention_bias_index(m.resolution).astype(np.int64)
    for key in to_timm_state_dict(model):
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
    if layout not in ("official", "timm"):
        raise ValueError(f"layout must be 'official' or 'timm', got {layout!r}")
    sd = to_timm_state_dict(model)
    sd.update(buffers_for(model, num_batches_tracked))
    if layout == "official":
        sd = timm_to_official(sd)
    return sd


def export_torch(
    model: nnx.Module,
    layout: str = "official",
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict:
    """The model as a PyTorch state dict ``{key: torch.Tensor}`` loadable by the official code
    (``layout='official'``, wrap as ``{'model': sd}`` like the released files) or by timm's
    ``efficientvit_msra`` (``layout='timm'``). Includes the ``attention_bias_idxs`` and
    ``num_batches_tracked`` buffers (see :func:`buffers_for`). Needs torch.

    Raises ValueError on a BN-folded model (no BatchNorm left to export).
    """
    import torch

    if not list(nnx.state(model, nnx.BatchStat)):
        raise ValueError("export_torch: the model has no BatchNorm statistics (a fused model?)")
    sd = export_state_dict(model, layout, num_batches_tracked)
    return {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in sd.items()}
