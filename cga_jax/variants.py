"""Recognise which registered variant a state dict belongs to, from its shapes alone."""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from cga_jax.config import VARIANTS


@functools.cache
def _signature(name: str) -> frozenset:
    from cga_jax.model import EfficientViT
    from cga_jax.weights import to_timm_state_dict

    cfg = VARIANTS[name].replace(num_classes=0)
    model = nnx.eval_shape(lambda: EfficientViT(cfg, rngs=nnx.Rngs(0)))
    sd = to_timm_state_dict(model)
    return frozenset((k, tuple(v.shape)) for k, v in sd.items())


def guess_variant(sd: dict) -> str | None:
    """The registered variant whose backbone (everything but the head) matches ``sd``'s shapes."""
    have = frozenset(
        (k, tuple(np.shape(v)))
        for k, v in sd.items()
        if not k.startswith("head")
        and not k.endswith(("num_batches_tracked", "attention_bias_idxs"))
    )
    for name in VARIANTS:
        if _signature(name) == have:
            return name
    return None
