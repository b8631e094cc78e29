"""Serving export with ``jax.export``: a StableHLO artifact with a symbolic batch dimension that
can be reloaded and run without cga_jax (``jax.export.deserialize``), on one or several platforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cga_jax.fuse import fuse_bn

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_serving(
    model: nnx.Module,
    img_size: int | tuple[int, int] = 224,
    *,
    fuse: bool = True,
    platforms: Sequence[str] | None = None,
) -> bytes:
    """Serialize ``model`` (eval mode, BN folded when ``fuse``) with its weights baked in.

    The artifact maps images (b, H, W, 3) float32 NHWC -> logits (b, classes), for any batch
    size b (``img_size``: an int for H = W, or (H, W)). ``platforms`` (default: the platform JAX
    runs on here) are lowered into one artifact; with the model's default ``impl="auto"`` each
    platform gets its own path - the XLA-CPU kernels on ``cpu``, standard XLA ops on ``cuda``,
    ``rocm`` and ``tpu`` - chosen when the artifact is loaded. Lowering for an accelerator
    needs no accelerator.
    """
    if platforms is not None:
        platforms = tuple(platforms)
        bad = [p for p in platforms if p not in PLATFORMS]
        if bad or not platforms:
            raise ValueError(
                f"platforms must be a non-empty subset of {PLATFORMS}, got {platforms}"
            )
    m = fuse_bn(model) if fuse else nnx.merge(*nnx.split(model))
    m.eval()
    graphdef, state = nnx.split(m)
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

    def forward(x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
    return jax.export.export(jax.jit(forward), platforms=platforms)(spec).serialize()


def load_serving(data: bytes) -> Callable[[jax.Array], jax.Array]:
    """The callable ``x -> logits`` of a serialized artifact (no model code needed)."""
    return jax.export.deserialize(bytearray(data)).call
