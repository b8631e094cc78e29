"""Device-side flip / RandAugment (JAX) against the PIL ops on the same images and parameters.

Bounds, per op and magnitude (0-255 levels, over 6 structured 64x48 images):

- point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd) and blend ops
  (Color, Contrast, Brightness, Sharpness): integer tables and float32 blends as Pillow's C
  code, so identical on XLA-CPU (at most 1 level elsewhere, where a backend may fuse a
  multiply-add);
- geometric ops (Rotate, ShearX/Y, TranslateX/YRel): Pillow samples in float64, the device in
  float32, so a truncation can land one level lower: bicubic/nearest mean abs diff <= 0.01,
  bilinear (whose linear form hits exact integers more often) <= 0.15, and fewer than 0.2 % of
  pixels off by more than one level (a sample on the fill boundary).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cga_jax.training import device_augment as da
from cga_jax.training import randaugment as ra

MAGNITUDES = (0.0, 2.5, 5.0, 7.5, 9.0, 10.0)
PIL_FILTER = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _image(seed: int, size=(64, 48)) -> np.ndarray:
    rng = np.random.RandomState(seed)
    smooth = rng.rand(6, 5, 3)
    big = np.asarray(Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.BICUBIC))
    noisy = big.astype(np.int32) + rng.randint(-30, 30, big.shape)
    return noisy.clip(0, 255).astype(np.uint8)


@functools.cache
def _images() -> np.ndarray:
    imgs = np.stack([_image(s) for s in range(6)])
    imgs[4] = imgs[4] // 3 + 60  # low contrast: AutoContrast / Equalize stretch it
    imgs[5, :, :, 1] = 77  # a constant channel: the "don't bother" branches
    return imgs


_apply = jax.jit(da.randaugment)


def _compare(name: str, magnitude: float, negate: bool, interp: str) -> np.ndarray:
    imgs = _images()
    h, w = imgs.shape[1:3]
    arg = ra.level_to_arg(name, magnitude, negate)
    want = np.stack(
        [
            np.asarray(ra.apply_op(Image.fromarray(i), name, arg, ra.FILL, PIL_FILTER[interp]))
            for i in imgs
        ]
    )
    p = np.stack([da.encode_ops([(name, arg, interp)], h, w, 2) for _ in imgs])
    got = np.asarray(_apply(jnp.asarray(imgs), jnp.asarray(p)))
    return np.abs(got.astype(np.int32) - want.astype(np.int32))


ALL_OPS = sorted(set(ra.INCREASING_OPS) | set(ra.ORIGINAL_OPS))
GEOMETRIC = [n for n in ALL_OPS if da.OPS[n.replace("Increasing", "")] == da.AFFINE]
PIXEL = [n for n in ALL_OPS if n not in GEOMETRIC]


@pytest.mark.parametrize("name", PIXEL)
def test_pixel_ops_match_pil(name):
    exact = jax.default_backend() == "cpu"
    for m in MAGNITUDES:
        for negate in (False, True):
            d = _compare(name, m, negate, "bicubic")
            if exact:
                assert d.max() == 0, (name, m, negate, d.mean())
            else:
                assert d.max() <= 1, (name, m, negate)


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_match_pil(name, interp):
    bound = 0.15 if interp == "bilinear" else 0.01
    for m in MAGNITUDES:
        for negate in (False, True):
            d = _compare(name, m, negate, interp)
            assert d.mean() <= bound, (name, interp, m, negate, d.mean())
            assert (d > 1).mean() < 0.002, (name, interp, m, negate)


def test_skipped_layers_and_flip():
    imgs = _images()
    none = np.full((len(imgs), 2, da.ROW), 0, np.float32)
    none[:, :, 0] = -1
    np.testing.assert_array_equal(np.asarray(_apply(jnp.asarray(imgs), jnp.asarray(none))), imgs)
    flags = np.array([1, 0, 1, 0, 0, 1], np.int32)
    out = np.asarray(da.flip(jnp.asarray(imgs), jnp.asarray(flags)))
    for k, f in enumerate(flags):
        np.testing.assert_array_equal(out[k], imgs[k][:, ::-1] if f else imgs[k])


def test_device_path_reproduces_host_randaugment():
    """TrainAugment with device_aug ships draws that, applied on the device, give the host
    path's image (same record rng): identical but for the sampler's float32 rounding."""
    from cga_jax.training.data import TrainAugment

    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    host = TrainAugment(40, randaugment=aug, reprob=0.25)
    dev = TrainAugment(40, randaugment=aug, reprob=0.25, device_aug=True)
    recs = [
        {"image": _image(s, (70, 55)), "label": np.int32(0), "valid": np.int32(1)}
        for s in range(24)
    ]
    a = [host.random_map(r, np.random.default_rng(k)) for k, r in enumerate(recs)]
    b = [dev.random_map(r, np.random.default_rng(k)) for k, r in enumerate(recs)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["erase"], y["erase"])
    batch = {k: jnp.asarray(np.stack([r[k] for r in b])) for k in ("image", "flip", "ra")}
    got = np.asarray(jax.jit(da.augment)(batch)).astype(np.int32)
    want = np.stack([r["image"] for r in a]).astype(np.int32)
    d = np.abs(got - want)
    assert d.mean() < 0.05 and (d > 1).mean() < 0.002, (d.mean(), (d > 1).mean())
    assert (np.stack([r["ra"][:, 0] for r in b]) >= 0).any()  # some ops were drawn


def test_autocontrast_tables_for_many_ranges():
    """PIL computes AutoContrast's table in float64 and truncates, which sometimes lands one
    below the exact value (e.g. at the maximum); the device table must follow it everywhere."""
    rng = np.random.default_rng(0)
    pairs = [(22, 255), (5, 212), (0, 25), (0, 255), (100, 101), (7, 7)]
    pairs += [tuple(sorted(rng.integers(0, 256, 2))) for _ in range(250)]
    imgs = np.zeros((len(pairs), 16, 16, 3), np.uint8)
    for k, (lo, hi) in enumerate(pairs):
        vals = np.linspace(lo, hi, 256).round().astype(np.uint8)
        imgs[k] = np.stack(
            [vals.reshape(16, 16), vals[::-1].reshape(16, 16), vals.reshape(16, 16).T], -1
        )
    p = np.stack([da.encode_ops([("AutoContrast", None, "bicubic")], 16, 16, 1) for _ in imgs])
    got = np.asarray(jax.jit(da.randaugment)(jnp.asarray(imgs), jnp.asarray(p)))
    want = np.stack(
        [np.asarray(ra.apply_op(Image.fromarray(i), "AutoContrast", None)) for i in imgs]
    )
    np.testing.assert_array_equal(got, want)
