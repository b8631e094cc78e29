"""Flip and RandAugment as batched JAX functions that run inside the jitted train step.

The host draws everything (Grain's record rng, :meth:`RandAugment.draw`, the same draws as the
host path, so a resumed run repeats itself) and ships per image:

- ``flip``: int32 (B,) 1 = mirror left-right (before RandAugment, as timm);
- ``ra``: float32 (B, L, 9) one row per RandAugment layer ``[op, arg, resample, a0..a5]``:
  ``op`` a code of :data:`OPS` (-1: layer skipped), ``arg`` the op's argument after timm's
  magnitude mapping, ``resample`` PIL's filter id (0 nearest, 2 bilinear, 3 bicubic) and
  ``a0..a5`` PIL's inverse affine matrix for the geometric ops (Rotate, ShearX/Y,
  TranslateX/YRel all become :data:`AFFINE`).

:func:`augment` applies them to uint8 (B, H, W, 3) images and returns uint8; normalisation and
random erasing follow in the step as before. Each op follows Pillow's C code: the point ops
(AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd) build the same integer
lookup tables, including AutoContrast's float64 truncations (a precomputed correction table);
the blend ops (Color, Contrast, Brightness, Sharpness) use the same integer grey level, mean,
3x3 smoothing kernel and float32 blend with truncation; the affine sampler uses the same
pixel-centre convention, fill test, edge clamping and cubic (a = -1) / linear polynomials.
Where the result can differ is float32 instead of float64 in the sampler's coordinates and
polynomials (a truncation can land one level lower, and a sample right at the image border
can fall on the other side of the fill test); ``tests/test_device_augment.py`` bounds the mean
and the share of differing pixels per op and magnitude.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cga_jax.training.ra_params import (
    AFFINE,
    AUTOCONTRAST,
    COLOR,
    CONTRAST,
    EQUALIZE,
    INVERT,
    OPS,
    POSTERIZE,
    ROW,
    SHARPNESS,
    SOLARIZE,
    SOLARIZE_ADD,
    encode_ops,
)
from cga_jax.training.randaugment import FILL

__all__ = ["OPS", "ROW", "augment", "encode_ops", "flip", "randaugment"]


@functools.cache
def _autocontrast_fix() -> np.ndarray:
    """bool (256 lo, 256 hi, 256 i): where PIL's float64 ``int(i * scale + offset)`` is one
    below the exact ``floor((i - lo) * 255 / (hi - lo))`` (clipped to 0..255 both)."""
    i = np.arange(256, dtype=np.float64)
    fix = np.zeros((256, 256, 256), bool)
    for lo in range(255):
        hi = np.arange(lo + 1, 256, dtype=np.float64)[:, None]
        scale = 255.0 / (hi - lo)
        pil = np.clip(np.trunc(i * scale + (-lo * scale)), 0, 255)
        exact = np.clip(np.floor((i - lo) * 255 / (hi - lo)), 0, 255)
        fix[lo, lo + 1 :] = pil < exact
    return fix


# ---- device side -------------------------------------------------------------------------------
def flip(images, flags):
    """(B, H, W, C), int (B,) -> images with the flagged ones mirrored left-right."""
    return jnp.where(flags[:, None, None, None] > 0, images[:, :, ::-1], images)


def _histogram(x):
    """int32 (B, H, W, 3) -> int32 (B, 3, 256) per-channel histograms."""
    b = x.shape[0]
    idx = (x + 256 * jnp.arange(3, dtype=x.dtype)).reshape(b, -1)
    return jax.vmap(lambda v: jnp.bincount(v, length=768))(idx).reshape(b, 3, 256)


def _apply_lut(x, lut):
    """x int32 (B, H, W, 3) in 0..255, lut int32 (B, 3, 256) -> lut[b, c, x]."""
    b = x.shape[0]
    idx = (x + 256 * jnp.arange(3, dtype=x.dtype)).reshape(b, -1)
    return jnp.take_along_axis(lut.reshape(b, 768), idx, axis=1).reshape(x.shape)


def _hist_luts(x):
    """AutoContrast and Equalize tables of each image, int32 (B, 3, 256) each."""
    hist = _histogram(x)
    i = jnp.arange(256, dtype=jnp.int32)
    ident = jnp.broadcast_to(i, hist.shape)
    nz = hist > 0
    # AutoContrast: first/last non-empty bin per channel; float64 truncation via the fix table
    lo = jnp.argmax(nz, axis=-1)[..., None]
    hi = 255 - jnp.argmax(nz[..., ::-1], axis=-1)[..., None]
    d = jnp.maximum(hi - lo, 1)
    exact = jnp.clip(((i - lo) * 255) // d, 0, 255)  # integer floor: exact on any backend
    fix = jnp.asarray(_autocontrast_fix())[lo[..., 0], hi[..., 0]]  # (B, 3, 256)
    auto = jnp.where(hi > lo, exact - fix.astype(jnp.int32), ident)
    # Equalize: PIL's integer steps
    last = jnp.take_along_axis(hist, hi, -1)
    step = (hist.sum(-1, keepdims=True) - last) // 255
    cum = jnp.cumsum(hist, axis=-1) - hist  # exclusive
    eq = (step // 2 + cum) // jnp.maximum(step, 1)
    flat = (nz.sum(-1, keepdims=True) <= 1) | (step == 0)
    eq = jnp.where(flat, ident, jnp.clip(eq, 0, 255))
    return auto, eq


def _luts(x, op, arg):
    """The lookup table of each image's point op (identity for other ops): int32 (B, 3, 256)."""
    b = x.shape[0]
    ident = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (b, 3, 256))
    needs_hist = (op == AUTOCONTRAST) | (op == EQUALIZE)
    auto, eq = jax.lax.cond(
        jnp.any(needs_hist), _hist_luts, lambda v: (ident, ident), x
    )  # the histograms only when an image needs them
    a = arg.astype(jnp.int32)[:, None, None]
    bits = jnp.clip(a, 0, 8)
    mask = (255 << (8 - bits)) & 255  # bits == 0: black, as the host path
    table = {
        AUTOCONTRAST: auto,
        EQUALIZE: eq,
        INVERT: 255 - ident,
        POSTERIZE: ident & mask,
        SOLARIZE: jnp.where(ident < a, ident, 255 - ident),
        SOLARIZE_ADD: jnp.where(ident < 128, jnp.minimum(255, ident + a), ident),
    }
    out = ident
    for code, lut in table.items():
        out = jnp.where((op == code)[:, None, None], lut, out)
    return out


def _blend(deg, img, alpha):
    """PIL ``Image.blend(deg, img, alpha)``: float32 ``deg + alpha * (img - deg)``,
    clipped and truncated to uint8 levels. deg/img float32 (B, H, W, 3), alpha (B,)."""
    a = alpha[:, None, None, None]
    diff = img - deg
    # C rounds the product, then the sum; the select keeps LLVM from contracting them into one
    # fused multiply-add (a different rounding)
    v = deg + jnp.where(diff == 0, 0.0, a * diff)
    return jnp.trunc(jnp.clip(v, 0.0, 255.0))


def _smooth(x):
    """PIL ``ImageFilter.SMOOTH`` (3x3, 1 1 1 / 1 5 1 / 1 1 1, / 13, +0.5, truncated) on
    float32 (B, H, W, 3); the one-pixel border is copied."""
    k1 = np.float32(1) / np.float32(13)
    k5 = np.float32(5) / np.float32(13)

    def row(r, centre):  # PIL's KERNEL1x3 on one row: left * k0 + mid * k1 + right * k2
        kc = k5 if centre else k1
        return r[:, :, :-2] * k1 + r[:, :, 1:-1] * kc + r[:, :, 2:] * k1

    ss = jnp.float32(0.5) + row(x[:, 2:], False)  # PIL adds the row below first
    ss = ss + row(x[:, 1:-1], True)
    ss = ss + row(x[:, :-2], False)
    inner = jnp.trunc(jnp.clip(ss, 0.0, 255.0))
    return x.at[:, 1:-1, 1:-1].set(inner)


def _blends(x, op, arg):
    """Color / Contrast / Brightness / Sharpness of each image (others unchanged)."""
    xf = x.astype(jnp.float32)
    grey = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16  # PIL "L"
    n = grey.shape[1] * grey.shape[2]
    mean = (2 * grey.sum((1, 2)) + n) // (2 * n)  # int(mean + 0.5)
    deg = jnp.where((op == COLOR)[:, None, None, None], grey[..., None].astype(jnp.float32), 0.0)
    deg = jnp.where(
        (op == CONTRAST)[:, None, None, None], mean[:, None, None, None].astype(jnp.float32), deg
    )
    deg = jnp.where((op == SHARPNESS)[:, None, None, None], _smooth(xf), deg)
    return _blend(deg, xf, arg).astype(jnp.int32)


def _cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro (a = -1), Horner form."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _affine(x, coeffs, resample, fill):
    """PIL ``Image.transform(AFFINE)`` of float32 (B, H, W, 3) with per-image inverse matrices
    (B, 6) and filters (B,) (0 nearest, 2 bilinear, 3 bicubic); outside pixels get ``fill``."""
    b, h, w, _ = x.shape
    a = [coeffs[:, k, None, None] for k in range(6)]
    xs = jnp.arange(w, dtype=jnp.float32)[None, None, :] + 0.5
    ys = jnp.arange(h, dtype=jnp.float32)[None, :, None] + 0.5
    xin = a[0] * xs + a[1] * ys + a[2]  # (B, H, W)
    yin = a[3] * xs + a[4] * ys + a[5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    fx, fy = xin - 0.5, yin - 0.5
    x0, y0 = jnp.floor(fx), jnp.floor(fy)
    dx, dy = (fx - x0)[..., None], (fy - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(b, h * w, 3)

    def tap(yi, xi):  # clamped gather: (B, H, W, 3)
        yi, xi = jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)
        idx = (yi * w + xi).reshape(b, -1, 1)
        return jnp.take_along_axis(flat, idx, axis=1).reshape(b, h, w, 3)

    def cubic():
        rows = [_cubic(*(tap(y0 + r, x0 + c) for c in (-1, 0, 1, 2)), dx) for r in (-1, 0, 1, 2)]
        return jnp.trunc(jnp.clip(_cubic(*rows, dy), 0.0, 255.0))

    def linear():
        r0 = [tap(y0, x0 + c) for c in (0, 1)]
        r1 = [tap(y0 + 1, x0 + c) for c in (0, 1)]
        v1 = r0[0] + (r0[1] - r0[0]) * dx
        v2 = r1[0] + (r1[1] - r1[0]) * dx
        return jnp.trunc(v1 + (v2 - v1) * dy)

    def nearest():
        return tap(jnp.floor(yin).astype(jnp.int32), jnp.floor(xin).astype(jnp.int32))

    rs = resample[:, None, None, None]
    out = x
    for code, fn in ((3, cubic), (2, linear), (0, nearest)):  # only the filters in use
        out = _when(rs == code, lambda o, c=code, f=fn: jnp.where(rs == c, f(), o), out)
    return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.float32))


def _when(pred, fn, x):
    """``fn(x)`` if any image needs it, else ``x`` (skips whole op groups per batch)."""
    return jax.lax.cond(jnp.any(pred), fn, lambda v: v, x)


def randaugment(images, ra, fill=FILL):
    """uint8 (B, H, W, 3), float32 (B, L, 9) -> uint8 (B, H, W, 3): the layers in order."""
    x = images.astype(jnp.int32)
    for layer in range(ra.shape[1]):
        p = ra[:, layer]
        op, arg = p[:, 0].astype(jnp.int32), p[:, 1]
        is_lut = (op >= AUTOCONTRAST) & (op <= SOLARIZE_ADD)
        is_blend = (op >= COLOR) & (op <= SHARPNESS)
        is_affine = op == AFFINE
        x = _when(
            is_lut,
            lambda v, op=op, arg=arg, m=is_lut: jnp.where(
                m[:, None, None, None], _apply_lut(v, _luts(v, op, arg)), v
            ),
            x,
        )
        x = _when(
            is_blend,
            lambda v, op=op, arg=arg, m=is_blend: jnp.where(
                m[:, None, None, None], _blends(v, op, arg), v
            ),
            x,
        )

        def geo(v, p=p, m=is_affine):
            out = _affine(v.astype(jnp.float32), p[:, 3:], p[:, 2].astype(jnp.int32), fill)
            return jnp.where(m[:, None, None, None], out.astype(jnp.int32), v)

        x = _when(is_affine, geo, x)
    return x.astype(jnp.uint8)


def augment(batch, fill=FILL):
    """The batch's uint8 images after the device-side flip and RandAugment (keys ``flip`` and
    ``ra``, each optional)."""
    x = batch["image"]
    if "flip" in batch:
        x = flip(x, batch["flip"])
    if "ra" in batch:
        x = randaugment(x, batch["ra"], fill)
    return x
