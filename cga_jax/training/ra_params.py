"""Host side of the device RandAugment: one record's drawn ops -> a small float32 array.

Row layout (one row per RandAugment layer, :data:`ROW` floats): ``[op, arg, resample, a0..a5]``
with ``op`` a code of :data:`OPS` (-1: layer skipped), ``arg`` the op's argument after timm's
magnitude mapping, ``resample`` PIL's filter id (0 nearest, 2 bilinear, 3 bicubic) and
``a0..a5`` PIL's inverse affine matrix of the geometric ops (Rotate, ShearX/Y, TranslateX/YRel
all become :data:`AFFINE`), computed in float64 exactly as ``Image.rotate`` / timm compute it.
numpy only: Grain workers run this without importing JAX.
"""

from __future__ import annotations

import math

import numpy as np

AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD = range(6)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, AFFINE = range(6, 11)
OPS = {
    "AutoContrast": AUTOCONTRAST,
    "Equalize": EQUALIZE,
    "Invert": INVERT,
    "Posterize": POSTERIZE,
    "Solarize": SOLARIZE,
    "SolarizeAdd": SOLARIZE_ADD,
    "Color": COLOR,
    "Contrast": CONTRAST,
    "Brightness": BRIGHTNESS,
    "Sharpness": SHARPNESS,
    "Rotate": AFFINE,
    "ShearX": AFFINE,
    "ShearY": AFFINE,
    "TranslateXRel": AFFINE,
    "TranslateYRel": AFFINE,
}
RESAMPLE_ID = {"nearest": 0, "bilinear": 2, "bicubic": 3}
ROW = 9  # floats per RandAugment layer


def affine_coeffs(name: str, arg: float, w: int, h: int) -> tuple[float, ...]:
    """PIL's inverse affine matrix (a0..a5: output pixel centre -> input position) of a
    geometric op on a ``w`` x ``h`` image, computed as ``Image.rotate`` / timm compute it."""
    if name == "Rotate":  # Image.rotate about the centre, no expand
        a = -math.radians(arg % 360.0)
        m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0]
        m += [round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
        cx, cy = w / 2, h / 2
        m[2] = m[0] * -cx + m[1] * -cy + cx
        m[5] = m[3] * -cx + m[4] * -cy + cy
        return tuple(m)
    return {
        "ShearX": (1.0, arg, 0.0, 0.0, 1.0, 0.0),
        "ShearY": (1.0, 0.0, 0.0, arg, 1.0, 0.0),
        "TranslateXRel": (1.0, 0.0, arg * w, 0.0, 1.0, 0.0),
        "TranslateYRel": (1.0, 0.0, 0.0, 0.0, 1.0, arg * h),
    }[name]


def encode_ops(ops, h: int, w: int, num_layers: int) -> np.ndarray:
    """``RandAugment.draw`` output for an ``h`` x ``w`` image -> float32 (num_layers, 9)."""
    out = np.zeros((num_layers, ROW), np.float32)
    out[:, 0] = -1
    for i, (name, arg, interp) in enumerate(ops):
        base = name.replace("Increasing", "")
        out[i, 0] = OPS[base]
        out[i, 2] = RESAMPLE_ID[interp]
        if OPS[base] == AFFINE:
            out[i, 3:] = affine_coeffs(base, arg, w, h)
        elif arg is not None:
            out[i, 1] = arg
    return out
