"""``create_model`` / ``list_models``, the names timm users know."""

from __future__ import annotations

import fnmatch
import os
import warnings

from flax import nnx

from cga_jax.config import VARIANTS, EfficientViTConfig
from cga_jax.model import EfficientViT

PRETRAINED_TAGS = ("r224_in1k",)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell pattern, e.g. ``list_models('*m4*')``."""
    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides) -> EfficientViTConfig:
    """The config of a registered model (``'efficientvit_m0'`` or ``'efficientvit_m0.r224_in1k'``)
    with any field overridden."""
    base, _, tag = name.partition(".")
    if base not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if tag and tag not in PRETRAINED_TAGS:
        raise ValueError(f"unknown tag {tag!r} for {base}; available: {', '.join(PRETRAINED_TAGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return VARIANTS[base].replace(**overrides)


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides,
) -> EfficientViT:
    """Build a model by name, optionally loading weights.

    Args:
      name: one of :func:`list_models` (a ``.r224_in1k`` tag is accepted).
      pretrained: a checkpoint file: PyTorch ``.pth`` in the official (``{'model': sd}``) or timm
        layout, ``.safetensors``, or a directory written by ``cga-jax convert`` (its
        ``model.safetensors`` or its Orbax checkpoint ``orbax/``; see :mod:`cga_jax.convert`). With ``num_classes`` different from the checkpoint's, the
        classifier is freshly initialised (fine-tuning).
      num_classes, img_size: override the variant's values (a different ``img_size`` resizes the
        attention-bias tables of the checkpoint where the window resolution changes).
      rngs: initialisation randomness (default ``nnx.Rngs(0)``).
      **overrides: any other :class:`EfficientViTConfig` field.
    """
    cfg = get_config(name, num_classes=num_classes, img_size=img_size, **overrides)
    if rngs is None:
        rngs = nnx.Rngs(0)
    model = EfficientViT(cfg, rngs=rngs)
    if pretrained is not None:
        from cga_jax.loading import load_pretrained

        for note in load_pretrained(model, pretrained, new_head=num_classes is not None):
            warnings.warn(note, stacklevel=2)
    return model
