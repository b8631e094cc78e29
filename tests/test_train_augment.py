"""RandAugment (against timm's op functions, pixel for pixel) and random erasing statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cga_jax.training import randaugment as ra


def _image(seed: int = 0, size=(37, 29)) -> Image.Image:
    rng = np.random.RandomState(seed)
    smooth = rng.rand(5, 4, 3)  # some structure, so that geometry and blur ops matter
    big = np.asarray(Image.fromarray((smooth * 255).astype(np.uint8)).resize(size))
    noisy = big.astype(np.int32) + rng.randint(-40, 40, big.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


# ---- parsing -----------------------------------------------------------------------------------
def test_parse_recipe_string():
    c = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert c == ra.RandAugmentConfig(magnitude=9, magnitude_std=0.5, increasing=True)
    assert c.num_layers == 2 and c.prob == 0.5 and c.magnitude_max is None
    assert c.ops == ra.INCREASING_OPS and len(c.ops) == 15
    c = ra.parse_rand_augment("rand-n3-m15-mmax15-p0.7-mstd101")
    assert (c.num_layers, c.magnitude, c.magnitude_max, c.prob) == (3, 15, 15, 0.7)
    assert c.magnitude_std == math.inf and not c.increasing
    assert ra.parse_rand_augment("rand-inc0").ops == ra.ORIGINAL_OPS


@pytest.mark.parametrize("bad", ["rand-m9-x3", "rand-mfoo", "augmix-m9", "rand-m9.5", "rand-tw"])
def test_parse_rejects_bad_strings(bad):
    with pytest.raises(ValueError, match="RandAugment"):
        ra.parse_rand_augment(bad)


# ---- determinism -------------------------------------------------------------------------------
def test_same_rng_same_result_and_ops_vary():
    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    img = _image()
    a = np.asarray(aug(img, np.random.default_rng(5)))
    b = np.asarray(aug(img, np.random.default_rng(5)))
    np.testing.assert_array_equal(a, b)
    outs = {np.asarray(aug(img, np.random.default_rng(s))).tobytes() for s in range(20)}
    assert len(outs) > 10  # different seeds, different augmentations
    assert np.asarray(img).tobytes() in outs  # both ops skipped (p = 0.25) happens too


def test_magnitude_noise_is_clipped():
    aug = ra.RandAugment("rand-m9-mstd0.5")
    rng = np.random.default_rng(0)
    ms = np.array([aug.sample_magnitude(rng) for _ in range(4000)])
    assert ms.max() == 10.0 and ms.min() > 6.0
    assert abs(np.median(ms) - 9.0) < 0.05
    assert ra.RandAugment("rand-m9").sample_magnitude(rng) == 9.0


# ---- timm parity -------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(set(ra.INCREASING_OPS) | set(ra.ORIGINAL_OPS)))
@pytest.mark.parametrize("magnitude", [0.0, 3.7, 9.0, 10.0])
@pytest.mark.parametrize("negate", [False, True])
def test_op_matches_timm(monkeypatch, name, magnitude, negate):
    """timm's AugmentOp (prob 1, no magnitude noise, bicubic, mean fill) with its random sign
    pinned vs our mapping + op: identical pixels."""
    import random

    auto_augment = pytest.importorskip("timm.data.auto_augment")
    hp = dict(img_mean=ra.FILL, interpolation=Image.Resampling.BICUBIC, translate_const=100)
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)
    monkeypatch.setattr(random, "random", lambda: 0.9 if negate else 0.1)  # > 0.5: negate
    img = _image(seed=int(magnitude * 10) + negate)
    arg = ra.level_to_arg(name, magnitude, negate)
    if name.startswith("Posterize") and arg == 0:  # new Pillow rejects 0 bits: black, as old
        assert not np.asarray(ra.apply_op(img, name, arg)).any()
        return
    want = np.asarray(op(img))
    got = np.asarray(ra.apply_op(img, name, arg, ra.FILL, Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, want)


@pytest.mark.torch
def test_bilinear_geometry_matches_timm():
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    img = _image(3)
    for fn, name in ((auto_augment.rotate, "Rotate"), (auto_augment.shear_x, "ShearX")):
        arg = ra.level_to_arg(name, 7.0, True)
        want = fn(img, arg, fillcolor=ra.FILL, resample=Image.Resampling.BILINEAR)
        got = ra.apply_op(img, name, arg, ra.FILL, Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- random erasing ----------------------------------------------------------------------------
def test_erasing_probability_and_area():
    from cga_jax.training.erasing import NO_BOX, erase_box

    rng = np.random.default_rng(0)
    h, w, n = 64, 48, 8000
    boxes = [erase_box(rng, h, w, prob=0.25) for _ in range(n)]
    hit = [b for b in boxes if b != NO_BOX]
    assert abs(len(hit) / n - 0.25) < 0.02  # ~25 % of the images (a fit is found ~always)
    for top, left, eh, ew in hit:
        assert 0 <= top and top + eh <= h and 0 <= left and left + ew <= w
        assert eh < h and ew < w  # timm's fit condition
        # area U(0.02, 1/3) of the image, up to rounding of the sides
        assert 0.02 * h * w - (eh + ew) <= eh * ew <= h * w / 3 + (eh + ew) + 1
        assert 0.3 - 0.1 <= eh / ew <= 1 / 0.3 + 0.6  # aspect ratio 0.3..3.3, rounding slack
    areas = np.array([eh * ew / (h * w) for _, _, eh, ew in hit])
    assert abs(areas.mean() - (0.02 + 1 / 3) / 2) < 0.03
    assert all(erase_box(rng, h, w, prob=0.0) == NO_BOX for _ in range(100))


def test_erasing_on_device_fills_only_the_box():
    import jax
    import jax.numpy as jnp

    from cga_jax.training.erasing import apply_erase

    x = jnp.full((3, 32, 32, 3), 5.0)
    boxes = jnp.array([[2, 3, 10, 20], [0, 0, 0, 0], [31, 31, 1, 1]], jnp.int32)
    y = np.asarray(apply_erase(jax.random.key(0), x, boxes))
    want = np.zeros((3, 32, 32), bool)
    want[0, 2:12, 3:23] = True
    want[2, 31, 31] = True
    np.testing.assert_array_equal(y[..., 0] != 5.0, want)
    assert abs(y[0, 2:12, 3:23].std() - 1.0) < 0.15 and abs(y[0, 2:12, 3:23].mean()) < 0.15


def test_train_augment_is_deterministic_and_emits_boxes():
    from cga_jax.training.data import TrainAugment

    aug = TrainAugment(24, randaugment=ra.RandAugment("rand-m9-mstd0.5-inc1"), reprob=0.25)
    r = {"image": np.asarray(_image(0, (40, 30))), "label": np.int32(1), "valid": np.int32(1)}
    a = aug.random_map(r, np.random.default_rng(3))
    b = aug.random_map(r, np.random.default_rng(3))
    assert a["image"].shape == (24, 24, 3) and a["erase"].shape == (4,)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["erase"], b["erase"])
    assert "erase" not in TrainAugment(24).random_map(r, np.random.default_rng(3))
