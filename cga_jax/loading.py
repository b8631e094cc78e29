"""Load weights into a model from any supported file."""

from __future__ import annotations

import os

from flax import nnx

from cga_jax.weights import (
    CheckpointError,
    detect_layout,
    load_timm_state_dict,
    official_to_timm,
    read_state_dict,
)


def state_dict_to_timm(sd: dict) -> tuple[dict, str]:
    """Any supported layout -> timm layout; returns (state dict, detected layout)."""
    layout = detect_layout(sd.keys())
    if layout == "official":
        return official_to_timm(sd), layout
    return dict(sd), layout


def load_pretrained(
    model: nnx.Module, path: str | os.PathLike, *, new_head: bool = False
) -> list[str]:
    """Load ``path`` into ``model`` in place (strict). With ``new_head``, a classifier whose size
    differs from the model's is dropped and the model's fresh one kept. Returns notes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from cga_jax.convert import read_converted  # a `cga-jax convert` output directory

        sd, notes = read_converted(path)[0], []
    else:
        sd, notes = read_state_dict(path)
    sd, _ = state_dict_to_timm(sd)
    skip: tuple[str, ...] = ()
    if new_head:
        for head in ("head", "head_dist"):
            w = sd.get(f"{head}.linear.weight")
            if w is not None and w.shape[0] != model.num_classes:
                skip += (f"{head}.linear",)
                notes.append(
                    f"{path}: {head}.linear has {w.shape[0]} classes, the model {model.num_classes}:"
                    " classifier left at its fresh initialisation"
                )
    try:
        notes += load_timm_state_dict(model, sd, skip_prefixes=skip, source=path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_variant_hint(model, sd)}") from None
    return notes


def _variant_hint(model: nnx.Module, sd: dict) -> str:
    from cga_jax.variants import guess_variant

    guess = guess_variant(sd)
    if guess is None:
        return ""
    mine = getattr(model, "cfg", None)
    return (
        f"\n  the checkpoint looks like {guess} (model built from embed_dim="
        f"{getattr(mine, 'embed_dim', '?')}); pass the matching model name"
    )
