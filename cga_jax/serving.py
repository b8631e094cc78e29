"""Serving export with ``jax.export``: a StableHLO artifact with a symbolic batch dimension that
can be reloaded and run without cga_jax (``jax.export.deserialize``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def export_serving(model: nnx.Module, img_size: int = 224, *, fuse: bool = True) -> bytes:
    """Serialize ``model`` (eval mode, BN folded when ``fuse``) with its weights baked in.

    The artifact maps images (b, img_size, img_size, 3) float32 NHWC -> logits (b, classes),
    for any batch size b.
    """
    from cga_jax.fuse import fuse_bn

    m = fuse_bn(model) if fuse else nnx.merge(*nnx.split(model))
    m.eval()
    graphdef, state = nnx.split(m)
    params = nnx.to_pure_dict(state)

    def forward(p, x):
        st = nnx.state(nnx.merge(graphdef, state))
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, img_size, img_size, 3), jnp.float32)
    fn = jax.jit(lambda x: forward(params, x))
    return jax.export.export(fn)(spec).serialize()


def load_serving(data: bytes):
    """The callable ``x -> logits`` of a serialized artifact (no model code needed)."""
    return jax.export.deserialize(bytearray(data)).call
