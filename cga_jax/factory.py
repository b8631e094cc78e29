"""``create_model`` / ``list_models`` / ``get_config``: models by name, as timm users know them."""

from __future__ import annotations

import fnmatch
import os
import warnings

from flax import nnx

from cga_jax.config import VARIANTS, EfficientViTConfig
from cga_jax.download import OFFICIAL_URLS
from cga_jax.errors import CheckpointError
from cga_jax.loading import load_pretrained
from cga_jax.model import EfficientViT

PRETRAINED_TAGS = ("r224_in1k",)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell pattern, e.g. ``list_models('*m4*')``."""
    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides) -> EfficientViTConfig:
    """The config of a registered model (``'efficientvit_m0'`` or ``'efficientvit_m0.r224_in1k'``)
    with any field overridden (``None`` values are ignored)."""
    base, _, tag = name.partition(".")
    if base not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if tag and tag not in PRETRAINED_TAGS:
        raise ValueError(f"unknown tag {tag!r} for {base}; available: {', '.join(PRETRAINED_TAGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return VARIANTS[base].replace(**overrides)


def pretrained_source(name: str, pretrained: bool | str | os.PathLike) -> str | os.PathLike:
    """What ``create_model(name, pretrained=...)`` loads: ``True`` and ``'official'`` mean the
    official release weights of ``name`` (``official:<model>``); anything else is passed on."""
    if pretrained is True or pretrained == "official":
        base = name.partition(".")[0]
        if base not in OFFICIAL_URLS:
            raise CheckpointError(
                f"{name}: no released weights (released: {', '.join(OFFICIAL_URLS)}); pass "
                "pretrained=<a checkpoint file, a converted directory, a URL or hf-hub:org/name>"
            )
        return f"official:{base}"
    return pretrained


def create_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides,
) -> EfficientViT:
    """Build a model by name, optionally loading weights.

    Args:
      name: one of :func:`list_models` (a ``.r224_in1k`` tag is accepted).
      pretrained: ``True`` or ``'official'`` (the official release weights, downloaded once into
        the cache: :mod:`cga_jax.download`), ``'hf-hub:timm/efficientvit_m0.r224_in1k'`` (a
        timm hub repository's ``model.safetensors``), an http(s)/file URL, or a local checkpoint:
        PyTorch ``.pth`` in the official (``{'model': sd}``) or timm layout, ``.safetensors``,
        ``.npz``, or a directory written by ``cga-jax convert`` (or its ``orbax/``). With
        ``num_classes`` different from the checkpoint's, the classifier is freshly initialised
        (fine-tuning); notes (resized tables, new classifier) are issued as warnings.
      num_classes, img_size: override the variant's values (a different ``img_size`` resizes the
        attention-bias tables of the checkpoint where the window resolution changes).
      rngs: initialisation randomness (default ``nnx.Rngs(0)``).
      **overrides: any other :class:`EfficientViTConfig` field.
    """
    cfg = get_config(name, num_classes=num_classes, img_size=img_size, **overrides)
    model = EfficientViT(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
    if pretrained is not None and pretrained is not False:
        source = pretrained_source(name, pretrained)
        for note in load_pretrained(model, source, new_head=num_classes is not None):
            warnings.warn(note, stacklevel=2)
    return model
