"""Random-resized-crop with the resample on the device: the host decodes, the step resizes.

With ``data.device_resize`` the host does not resample the crop box (Pillow's bicubic is the
largest host cost of the ``fast`` path). :func:`box_canvas` decodes the image at the same DCT
scale as :func:`~cga_jax.training.fast_decode.decode_crop`, copies the box plus a margin of
:data:`MARGIN` px (the bicubic filter's reach) into a fixed-size uint8 canvas
(:func:`canvas_shape`; a box whose long side is vertical is stored transposed, so the canvas
needs only one long side) and returns it with ``crop`` float32 (7,)
``[y0, x0, y1, x1, valid_h, valid_w, transposed]`` (the box and the copied extent in canvas
pixels). A box that does not fit the canvas (only at the 1/8 DCT scale) is first reduced on the
host by an integer factor (Pillow ``reduce``, a box average, as Pillow's ``reducing_gap``).

:func:`resize_crops` runs inside the jitted step: per image, two small matmuls with PIL's
antialiased bicubic weights (``a = -0.5``, support scaled by the downscale factor, the same
centre convention, edge truncation and renormalisation, coefficients rounded to PIL's 22-bit
fixed point, rounded to uint8 between the canvas's horizontal and vertical pass). Where
Pillow runs its two passes in the same order it is Pillow's ``resize(box=...)`` up to float32
rounding; Pillow 13 picks the order per image, so for some boxes (most of the transposed
ones) the uint8 rounding between the passes differs. ``tests/test_device_resize.py`` bounds
the difference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cga_jax.training.fast_decode import decode_for_box

MARGIN = 6  # px kept around the box: bicubic support 2 x the downscale factor (< 3 here)
PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)


def canvas_shape(size: int, ratio=(3 / 4, 4 / 3)) -> tuple[int, int]:
    """(H, W) of the canvas for crops resized to ``size`` with aspect ratios in ``ratio``.

    Below the 1/8 DCT scale the decoded box has its short side under ``2 * size`` (otherwise a
    smaller scale would have been chosen) and its long side under that times the largest
    aspect ratio; plus the margin on both sides."""
    short = 2 * size
    long = math.ceil(short * max(ratio[1], 1 / ratio[0])) + 1
    return short + 2 * MARGIN, long + 2 * MARGIN


def _span(lo: float, hi: float, n: int, room: int) -> tuple[int, int]:
    """The pixel range [a, b) of an axis of length ``n`` to copy for the box [lo, hi): the
    box's pixels plus up to MARGIN each side, at most ``room`` pixels."""
    a, b = math.floor(lo), min(math.ceil(hi), n)
    extra = max(room - (b - a), 0)
    a2 = max(a - min(MARGIN, extra // 2), 0)
    b2 = min(b + min(MARGIN, extra - (a - a2)), n)
    return a2, b2


def box_canvas(
    im: Image.Image,
    top: int,
    left: int,
    box_h: int,
    box_w: int,
    size: int,
    canvas: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``im`` (a lazily opened PIL image) for the box (``top``, ``left``, ``box_h``,
    ``box_w`` in full-size pixels) -> (uint8 ``canvas`` + (3,), float32 (7,) ``crop``).
    Raises what Pillow raises for a corrupt or truncated file."""
    im, s = decode_for_box(im, box_h, box_w, size)
    if im.mode != "RGB":
        im = im.convert("RGB")
    f = 1.0 / s
    y0, x0, y1, x1 = top * f, left * f, (top + box_h) * f, (left + box_w) * f
    ch, cw = canvas
    t = (y1 - y0 > x1 - x0) != (ch > cw)  # the box's long side along the canvas's long side
    room_h, room_w = (cw, ch) if t else (ch, cw)  # room along the image's y and x
    k = max(math.ceil((y1 - y0) / (room_h - 1)), math.ceil((x1 - x0) / (room_w - 1)))
    if k > 1:  # too large for the canvas: an integer box-average reduction first
        im = im.reduce(k)
        y0, x0, y1, x1 = y0 / k, x0 / k, y1 / k, x1 / k
    a, b = _span(y0, y1, im.size[1], room_h)
    c, d = _span(x0, x1, im.size[0], room_w)
    region = im.crop((c, a, d, b))
    if t:  # Pillow's transpose is a fast C copy; numpy's strided one is not
        region = region.transpose(Image.Transpose.TRANSPOSE)
        crop = (x0 - c, y0 - a, x1 - c, y1 - a)
    else:
        crop = (y0 - a, x0 - c, y1 - a, x1 - c)
    region = np.asarray(region)
    out = np.zeros((ch, cw, 3), np.uint8)
    out[: region.shape[0], : region.shape[1]] = region
    return out, np.array([*crop, *region.shape[:2], float(t)], np.float32)


def blank_crop() -> np.ndarray:
    """float32 (7,) ``crop`` of an unreadable image (a valid 1 x 1 box of the black canvas)."""
    return np.array([0, 0, 1, 1, 1, 1, 0], np.float32)


# ---- device side -------------------------------------------------------------------------------
def _cubic(x):
    """PIL's bicubic kernel, a = -0.5."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _weights(lo, hi, valid, n_in: int, size: int):
    """float32 (size, n_in) resampling matrix of one axis: the input range [lo, hi) to
    ``size`` outputs, inputs >= ``valid`` outside the image (Pillow's ``precompute_coeffs``)."""
    scale = (hi - lo) / size
    fs = jnp.maximum(scale, 1.0)
    support = 2.0 * fs
    center = lo + (jnp.arange(size, dtype=jnp.float32) + 0.5) * scale
    first = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
    end = jnp.minimum(jnp.trunc(center + support + 0.5), valid)
    j = jnp.arange(n_in, dtype=jnp.float32)[None]
    inside = (j >= first[:, None]) & (j < end[:, None])
    w = jnp.where(inside, _cubic((j - center[:, None] + 0.5) / fs), 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    w = w / jnp.where(total == 0.0, 1.0, total)
    one = float(1 << PRECISION_BITS)  # Pillow rounds the coefficients half away from zero
    return jnp.trunc(w * one + jnp.where(w < 0, -0.5, 0.5)) / one


def _round8(x):
    """Pillow's ``clip8((sum + 2**21) >> 22)`` on the float sum."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resize_crops(canvas, crop, size: int):
    """uint8 (B, Hc, Wc, 3) canvases, float32 (B, 7) crops -> uint8 (B, size, size, 3): each
    box resampled with Pillow's bicubic, transposed boxes turned back."""
    _, hc, wc, _ = canvas.shape
    hi = jax.lax.Precision.HIGHEST

    def one(x, c):
        wy = _weights(c[0], c[2], c[4], hc, size)  # (size, Hc)
        wx = _weights(c[1], c[3], c[5], wc, size)  # (size, Wc)
        tmp = _round8(jnp.einsum("ow,hwc->hoc", wx, x.astype(jnp.float32), precision=hi))
        out = _round8(jnp.einsum("oh,hwc->owc", wy, tmp, precision=hi))
        return jnp.where(c[6] > 0, out.transpose(1, 0, 2), out).astype(jnp.uint8)

    return jax.vmap(one)(canvas, crop)
