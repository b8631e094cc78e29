"""The one model builder of the trainer, for the student and the teacher alike.

A model spec (:func:`cga_jax.training.recipe.model_spec`) names a variant, overrides some of its
:class:`~cga_jax.EfficientViTConfig` fields and points at weights. :func:`model_config` resolves
it without building anything (the start-up check uses it); :func:`build_model` builds the model and
loads the weights.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from flax import nnx

from cga_jax import EfficientViT, EfficientViTConfig, get_config
from cga_jax.loading import load_pretrained
from cga_jax.training.recipe import ARCH_FIELDS


def model_config(
    spec, *, img_size: int, num_classes: int, distillation: bool
) -> EfficientViTConfig:
    """The variant ``spec.name`` with the spec's non-None fields and the given run fields.
    Raises ``ValueError`` for an unknown name or an inconsistent architecture."""
    overrides = {f: spec[f] for f in ARCH_FIELDS if spec[f] is not None}
    return get_config(
        spec.name,
        img_size=img_size,
        num_classes=num_classes,
        distillation=distillation,
        **overrides,
    )


def build_model(
    spec, *, img_size: int, num_classes: int, distillation: bool, seed: int, new_head: bool
) -> EfficientViT:
    """The model of ``spec``, with ``spec.pretrained``'s weights when given.

    ``num_classes`` and ``distillation`` are the run's (the caller resolves the spec's values
    against the data and ``distill.kind``). ``new_head``: a checkpoint classifier of another size
    is dropped and the fresh one kept (fine-tuning); otherwise the load is strict (a teacher).

    ``impl="auto"`` is resolved for this process's backend (the XLA-CPU kernels on CPU, the
    standard ops elsewhere): a training step is compiled for one platform only, so tracing the
    other branch of ``lax.platform_dependent`` would only cost time.
    """
    cfg = model_config(spec, img_size=img_size, num_classes=num_classes, distillation=distillation)
    if cfg.impl == "auto":
        cfg = dataclasses.replace(cfg, impl="cpu" if jax.default_backend() == "cpu" else "standard")
    model = EfficientViT(cfg, rngs=nnx.Rngs(seed))
    if spec.pretrained:
        for note in load_pretrained(model, spec.pretrained, new_head=new_head):
            warnings.warn(note, stacklevel=2)
    return model
