"""Recognise which registered variant a state dict belongs to, from its shapes alone."""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx, traverse_util

from cga_jax.config import VARIANTS


@functools.cache
def _signature(name: str) -> frozenset:
    from cga_jax.model import EfficientViT
    from cga_jax.weights import path_to_timm_key

    cfg = VARIANTS[name].replace(num_classes=0)
    model = nnx.eval_shape(lambda: EfficientViT(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    out = []
    for path, leaf in traverse_util.flatten_dict(pure).items():
        # abstract leaves (ShapeDtypeStruct): a zero-strided stand-in of the right shape
        key, v = path_to_timm_key(path, np.broadcast_to(np.float32(0), leaf.shape))
        out.append((key, tuple(v.shape)))
    return frozenset(out)


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
