"""Stand-ins for what this offline machine lacks: images and trained weights.

* :func:`write_images`: a folder of generated PNG images (smooth colour fields, discs, stripes,
  noise; random sizes) - calibration and evaluation sets for int8 quantization.
* :func:`condition_`: random weights made *well conditioned* the way trained residual networks
  are: every residual branch's last BatchNorm scaled down (gain 0.1), then BatchNorm statistics
  measured on images. Untrained weights with unit-gain branches (the fixtures) are chaotic - a
  0.1% input perturbation already changes a quarter of their top-1 predictions - so top-1
  agreement of an int8 model with them says little about quantization; see docs/deploy.md.
"""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cga_jax.attention import CascadedGroupAttention
from cga_jax.layers import BatchNorm, ConvMlp, ConvNorm, ResidualDrop, set_impl


def _image(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    field = rng.standard_normal((h // 32 + 2, w // 32 + 2, 3))
    field = (field - field.min()) / (np.ptp(field) + 1e-9) * 255
    img = np.asarray(
        Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32
    )
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.randint(1, 6)):
        cy, cx, r = rng.randint(0, h), rng.randint(0, w), rng.randint(10, min(h, w) // 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.randint(0, 256, 3)
    f = rng.uniform(0.01, 0.1)
    img += 40 * np.sin(f * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)))[..., None]
    img += rng.standard_normal(img.shape) * rng.uniform(0, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(
    folder: str | os.PathLike, n: int, seed: int = 0, sizes: tuple[int, int] = (200, 400)
) -> list[pathlib.Path]:
    """Write ``n`` generated RGB PNGs (sides in ``sizes``) to ``folder``; returns the paths."""
    root = pathlib.Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n):
        h, w = rng.randint(*sizes), rng.randint(*sizes)
        paths.append(root / f"img_{i:04d}.png")
        Image.fromarray(_image(rng, h, w)).save(paths[-1])
    return paths


def _last_bn(branch: nnx.Module) -> BatchNorm:
    """The BatchNorm that ends a residual branch."""
    if isinstance(branch, ConvNorm):
        return branch.bn
    if isinstance(branch, ConvMlp):
        return branch.pw2.bn
    if isinstance(branch, CascadedGroupAttention):
        return branch.proj[1].bn
    if hasattr(branch, "attn"):  # LocalWindowAttention
        return _last_bn(branch.attn)
    raise TypeError(f"no final BatchNorm known for {type(branch).__name__}")


def condition_(model: nnx.Module, images: np.ndarray, gain: float = 0.1) -> nnx.Module:
    """Scale every residual branch's final BN by ``gain``, then set every BN's running
    statistics to those of ``images`` (float32 (N, H, W, 3), normalised), layer by layer as
    one training-mode forward computes them. In place; leaves ``model`` in eval mode."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, ResidualDrop):
            bn = _last_bn(m.m)
            bn.scale[...] = bn.scale[...] * gain
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # running stats := this batch's
    model.train()
    impls = {id(m): m.impl for _, m in nnx.iter_modules(model) if hasattr(m, "impl")}
    set_impl(model, "standard")  # plain lax ops: compiles faster than the CPU kernels
    nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))  # one compile, not one per op
    for _, m in nnx.iter_modules(model):
        if id(m) in impls:
            m.impl = impls[id(m)]
    for bn, mom in zip(bns, momenta, strict=True):
        bn.momentum = mom
    model.eval()
    return model
