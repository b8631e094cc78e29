"""RandAugment as timm's ``rand_augment_transform`` defines it, on PIL images, numpy randomness.

``"rand-m9-mstd0.5-inc1"`` (the EfficientViT / DeiT recipe): per image, ``num_layers`` (2) ops
drawn uniformly with replacement from the 15-op set; each is applied with probability ``prob``
(0.5) at magnitude ``N(9, 0.5)`` clipped to ``[0, 10]``; signed ops (rotate, shear, translate,
the enhance blends) get a random sign. ``inc1`` selects the "increasing" set, whose strength grows
with the magnitude. Geometric ops fill with the ImageNet mean pixel and resample bicubic (or a
random one of bilinear/bicubic with ``interpolation="random"``, timm's default).

All randomness comes from the ``numpy.random.Generator`` passed in (Grain's per-record rng), so a
record's augmentation is a function of the sampler seed and index: resumable and deterministic.
The op functions and the magnitude-to-argument mappings are checked pixel for pixel against
timm's in ``tests/test_train_augment.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cga_jax.preprocess import IMAGENET_MEAN

LEVEL_DENOM = 10.0  # magnitude M maps to level M / 10
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # the mean pixel, (124, 116, 104)
INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
ORIGINAL_OPS = tuple(
    n.replace("Increasing", "") for n in INCREASING_OPS
)  # timm's default ("inc0") set
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
INTERPOLATIONS = (*RESAMPLE, "random")  # "random": one of RESAMPLE per op (timm's default)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed ``rand-...`` string (timm defaults for absent sections)."""

    magnitude: float = 10.0  # m
    num_layers: int = 2  # n
    magnitude_std: float = 0.0  # mstd; inf (or > 100 in the string): uniform in [0, magnitude]
    magnitude_max: float | None = None  # mmax; None: 10
    increasing: bool = False  # inc
    prob: float = 0.5  # p

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS


def parse_rand_augment(spec: str) -> RandAugmentConfig:
    """``"rand-m9-n2-mstd0.5-mmax10-inc1-p0.5"`` (sections in any order) -> config.

    Raises ``ValueError`` naming the bad section for anything timm would reject, and for the
    transform-set (``t...``) sections, which are not implemented here.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}")
    kw: dict = {}
    for sec in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", sec)
        if m is None:
            raise ValueError(
                f"bad RandAugment section {sec!r} in {spec!r}: expected m<int>, n<int>, "
                "mstd<float>, mmax<int>, inc<0|1> or p<float> (e.g. 'rand-m9-mstd0.5-inc1')"
            )
        key, val = m.groups()
        try:
            if key == "mstd":
                kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
            elif key == "mmax":
                kw["magnitude_max"] = float(int(val))
            elif key == "inc":
                kw["increasing"] = bool(int(val))
            elif key == "m":
                kw["magnitude"] = float(int(val))
            elif key == "n":
                kw["num_layers"] = int(val)
            else:
                kw["prob"] = float(val)
        except ValueError as e:  # e.g. "m9.5": timm's int() fails too
            raise ValueError(f"bad RandAugment section {sec!r} in {spec!r}: {e}") from None
    return RandAugmentConfig(**kw)


# ---- magnitude -> op argument (timm's *_level_to_arg), level in [0, mmax] ------------------------
def _signed(v: float, negate: bool) -> float:
    return -v if negate else v


def level_to_arg(name: str, magnitude: float, negate: bool, translate_pct: float = 0.45):
    """The op argument for ``magnitude`` (0..10); ``negate`` is the random sign of signed ops."""
    lv = magnitude / LEVEL_DENOM
    base = name.replace("Increasing", "")
    if base in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _signed(lv * 30.0, negate)
    if name in ("ShearX", "ShearY"):
        return _signed(lv * 0.3, negate)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(lv * translate_pct, negate)
    if name == "Posterize":  # bits kept, 0..4: weaker with the magnitude
        return int(lv * 4)
    if name == "PosterizeIncreasing":  # 4..0
        return 4 - int(lv * 4)
    if name == "Solarize":  # threshold 0..256
        return min(256, int(lv * 256))
    if name == "SolarizeIncreasing":  # 256..0
        return 256 - min(256, int(lv * 256))
    if name == "SolarizeAdd":
        return min(128, int(lv * 110))
    if name.endswith("Increasing"):  # enhance factor 1 -/+ 0.9 lv, at least 0.1
        return max(0.1, 1.0 + _signed(lv * 0.9, negate))
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    raise ValueError(f"unknown RandAugment op {name!r}")


# ---- the ops (PIL in, PIL out) -------------------------------------------------------------
def _affine(img: Image.Image, coeffs, fill, resample) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` high bits. ``bits=0`` (PosterizeIncreasing at magnitude 10) is a black
    image, as older Pillow returned; Pillow >= 12 rejects it (timm then raises)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


_ENHANCE = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}


def apply_op(img: Image.Image, name: str, arg, fill=FILL, resample=Image.Resampling.BICUBIC):
    """Apply op ``name`` with its argument (from :func:`level_to_arg`) to an RGB PIL image."""
    base = name.replace("Increasing", "")
    w, h = img.size
    ops: dict[str, Callable[[], Image.Image]] = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img),
        "Rotate": lambda: img.rotate(arg, resample, fillcolor=fill),
        "Posterize": lambda: _posterize(img, arg),
        "Solarize": lambda: ImageOps.solarize(img, arg),
        "SolarizeAdd": lambda: _solarize_add(img, arg),
        "ShearX": lambda: _affine(img, (1, arg, 0, 0, 1, 0), fill, resample),
        "ShearY": lambda: _affine(img, (1, 0, 0, arg, 1, 0), fill, resample),
        "TranslateXRel": lambda: _affine(img, (1, 0, arg * w, 0, 1, 0), fill, resample),
        "TranslateYRel": lambda: _affine(img, (1, 0, 0, 0, 1, arg * h), fill, resample),
    }
    if base in _ENHANCE:
        return _ENHANCE[base](img).enhance(arg)
    if base not in ops:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return ops[base]()


class RandAugment:
    """``ra(pil_image, rng) -> pil_image`` for a :class:`RandAugmentConfig` (or spec string).

    ``interpolation``: "bicubic" (the EfficientViT recipe's ``--train-interpolation``),
    "bilinear", or "random" (one of the two per op, timm's default).
    """

    def __init__(
        self,
        cfg: RandAugmentConfig | str,
        fill: tuple[int, int, int] = FILL,
        interpolation: str = "bicubic",
        translate_pct: float = 0.45,
    ):
        self.cfg = parse_rand_augment(cfg) if isinstance(cfg, str) else cfg
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be bilinear, bicubic or random: {interpolation}")
        self.fill, self.interpolation, self.translate_pct = fill, interpolation, translate_pct

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        c = self.cfg
        m = c.magnitude
        if c.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif c.magnitude_std > 0:
            m = rng.normal(m, c.magnitude_std)
        return float(min(max(m, 0.0), c.magnitude_max or LEVEL_DENOM))

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float | int | None, str]]:
        """The ops applied to one image, in order: ``[(name, arg, interpolation)]`` (skipped
        layers left out). :meth:`__call__` applies exactly these; the device path
        (:mod:`cga_jax.training.device_augment`) ships them with the batch."""
        ops, out = self.cfg.ops, []
        for k in rng.integers(0, len(ops), size=self.cfg.num_layers):
            if self.cfg.prob < 1.0 and rng.uniform() > self.cfg.prob:
                continue
            m = self.sample_magnitude(rng)
            arg = level_to_arg(ops[k], m, bool(rng.uniform() > 0.5), self.translate_pct)
            interp = self.interpolation
            if interp == "random":
                interp = ("bilinear", "bicubic")[int(rng.integers(0, 2))]
            out.append((ops[k], arg, interp))
        return out

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name, arg, interp in self.draw(rng):
            img = apply_op(img, name, arg, self.fill, RESAMPLE[interp])
        return img
