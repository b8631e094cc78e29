"""Random erasing, timm ``RandomErasing(probability, mode='pixel', max_count=1)`` semantics.

With probability ``prob`` an image gets one rectangle of area ``U(0.02, 1/3)`` of the image and
aspect ratio ``exp(U(log 0.3, log 1/0.3))``; up to 10 draws until it fits (``h < H`` and
``w < W``), otherwise nothing is erased. In 'pixel' mode the rectangle is filled with per-pixel
N(0, 1) noise *after* normalisation, i.e. in normalised units.

The box is drawn on the host, per record, from Grain's record rng (:func:`erase_box`); the batch
carries it as ``erase`` int32 (B, 4) ``(top, left, height, width)``, height 0 meaning none. The
noise is drawn on the device inside the jitted step from the step key (:func:`apply_erase`), so
the uint8 images still travel to the device and the normalisation stays there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NO_BOX = (0, 0, 0, 0)


def erase_box(
    rng: np.random.Generator,
    h: int,
    w: int,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """-> (top, left, height, width) of the region to erase, or :data:`NO_BOX`."""
    if prob <= 0 or rng.uniform() > prob:
        return NO_BOX
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target = rng.uniform(*area) * h * w
        ar = math.exp(rng.uniform(*log_ar))
        eh, ew = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if ew < w and eh < h:
            top = int(rng.integers(0, h - eh + 1))  # timm: random.randint, inclusive
            left = int(rng.integers(0, w - ew + 1))
            return top, left, eh, ew
    return NO_BOX


def apply_erase(key, x, boxes):
    """On device: x (B, H, W, C) normalised, boxes int32 (B, 4) -> x with each box filled with
    per-pixel N(0, 1) noise (``key``: the step's key)."""
    _, h, w, _ = x.shape
    top, left, eh, ew = (boxes[:, i, None, None] for i in range(4))
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)  # (B, H, W)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(inside[..., None], noise, x)
