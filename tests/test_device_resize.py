"""``data.device_resize``: the host ships the decoded crop box in a canvas, the step resamples it
with Pillow's bicubic."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image

from cga_jax.training import data as data_lib
from cga_jax.training import device_resize as dr
from cga_jax.training import fast_decode as fd
from cga_jax.training.randaugment import RandAugment
from cga_jax.training.recipe import imagenet_recipe
from cga_jax.training.validate import check_config


def _jpeg(seed: int, size_range=(375, 640)) -> bytes:
    from bench.input_data import synth_image

    buf = io.BytesIO()
    synth_image(seed, size_range=size_range).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pil_crop(data: bytes, top: int, left: int, bh: int, bw: int, size: int) -> np.ndarray:
    """Pillow's bicubic resize of the box from the image decoded at the same DCT scale."""
    im = fd.open_image(data)
    w, h = im.size
    s = fd.dct_scale(bh, bw, size)
    if s > 1:
        im.draft("RGB", (w // s, h // s))
    f = 1.0 / s
    box = (left * f, top * f, (left + bw) * f, (top + bh) * f)
    return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC, box=box))


def test_canvas_holds_every_box_below_the_eighth_scale():
    ch, cw = dr.canvas_shape(224)
    assert (ch, cw) == (448 + 2 * dr.MARGIN, 599 + 2 * dr.MARGIN)
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(100, 1800, 2))
        t, left, bh, bw = data_lib.random_resized_crop_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        s = fd.dct_scale(bh, bw, 224)
        if s < 8:  # the decoded box fits the canvas in one of its two orientations
            assert min(bh, bw) / s <= ch and max(bh, bw) / s <= cw


def test_device_resize_matches_pillow_bicubic():
    """Random-resized crops of 375-640 px JPEGs (the DCT-scaled ones included): the device
    resample of the canvas is Pillow's resize of the same box; mean abs difference <= 0.3 levels
    per image (where the two passes run in the other order than Pillow's: the uint8 rounding
    between them), <= 0.005 on average over boxes stored upright (the same order here: float
    rounding), no pixel off by more than 3."""
    size = 224
    canvas = dr.canvas_shape(size)
    rng = np.random.default_rng(1)
    cans, crops, want = [], [], []
    for i in range(24):
        data = _jpeg(i)
        im = fd.open_image(data)
        w, h = im.size
        t, left, bh, bw = data_lib.random_resized_crop_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        c, cr = dr.box_canvas(im, t, left, bh, bw, size, canvas)
        assert c.shape == (*canvas, 3) and c.dtype == np.uint8
        assert cr.shape == (7,) and cr.dtype == np.float32
        cans.append(c)
        crops.append(cr)
        want.append(_pil_crop(data, t, left, bh, bw, size))
    got = np.asarray(
        jax.jit(dr.resize_crops, static_argnums=2)(np.stack(cans), np.stack(crops), size)
    )
    assert got.shape == (24, size, size, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - np.stack(want))
    per_image = diff.reshape(24, -1).mean(1)
    upright = np.stack(crops)[:, 6] == 0
    assert upright.any() and (~upright).any()
    assert per_image.max() <= 0.3, per_image
    assert per_image[upright].mean() <= 0.005, per_image
    assert diff.max() <= 3


def test_a_box_larger_than_the_canvas_is_reduced_on_the_host():
    """A 1/8-scale decode that still leaves the box larger than the canvas: reduced by an
    integer factor first, and still close to Pillow's resize of the whole box."""
    data = _jpeg(5, size_range=(900, 1000))
    im = fd.open_image(data)
    w, h = im.size
    size = 48  # the box is >= 8 x 48 px: decoded at 1/8, ~110 px > the 108 px canvas
    canvas = dr.canvas_shape(size)
    c, cr = dr.box_canvas(im, 0, 0, h, w, size, canvas)
    assert cr[4] <= canvas[0] and cr[5] <= canvas[1]
    got = np.asarray(dr.resize_crops(c[None], cr[None], size))[0]
    want = _pil_crop(data, 0, 0, h, w, size)
    assert np.abs(got.astype(int) - want).mean() < 1.5


def _folder(root, n=6):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        (root / "ab"[i % 2] / f"{i}.jpg").write_bytes(_jpeg(i, (60, 90)))
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage" * 20)


def test_loader_ships_canvases_and_resumes_exactly(tmp_path):
    _folder(tmp_path / "train")
    cfg = imagenet_recipe()
    cfg.img_size, cfg.batch_size = 24, 8
    cfg.data.update(dict(workers=0, reprob=0.25, repeated_aug=1, device_resize=True))
    check_config(cfg)
    loader = data_lib.train_loader(cfg, data_lib.FolderSource(tmp_path / "train"), 0, 1, seed=0)
    it = iter(loader)
    b = next(it)
    ch, cw = dr.canvas_shape(24)
    assert b["image"].shape == (8, ch, cw, 3) and b["image"].dtype == np.uint8
    assert b["crop"].shape == (8, 7) and b["crop"].dtype == np.float32
    assert b["ra"].shape == (8, 2, 9) and b["flip"].shape == (8,) and b["erase"].shape == (8, 4)
    assert int((1 - b["valid"]).sum()) >= 1  # the unreadable file: black canvas, valid 0
    state = it.get_state()
    nxt = next(it)
    it2 = iter(loader)
    it2.set_state(state)
    again = next(it2)
    for k in nxt:
        np.testing.assert_array_equal(again[k], nxt[k], err_msg=k)


def test_same_draws_as_host_resize():
    """The same record rng gives the same flip, RandAugment ops and erasing box with and without
    device_resize, and the resized canvas is the host's crop up to Pillow's reducing_gap."""
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    kw = dict(randaugment=ra, reprob=0.25, device_aug=True, mode="fast")
    host = data_lib.TrainAugment(32, **kw)
    dev = data_lib.TrainAugment(32, device_resize=True, **kw)
    for i in range(6):
        r = {"bytes": _jpeg(i, (60, 90)), "label": np.int32(0)}
        a = host.random_map(r, np.random.default_rng(i))
        b = dev.random_map(r, np.random.default_rng(i))
        assert b.keys() == a.keys() | {"crop"}
        for k in a:
            if k != "image":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        img = np.asarray(dr.resize_crops(b["image"][None], b["crop"][None], 32))[0]
        assert np.abs(img.astype(int) - a["image"]).mean() < 1.0


def test_config_rejects_device_resize_without_fast_decode():
    cfg = imagenet_recipe()
    cfg.data.update(dict(device_resize=True, decode="exact"))
    with pytest.raises(ValueError, match="data.device_resize"):
        check_config(cfg)
    with pytest.raises(ValueError, match="device_resize"):
        data_lib.TrainAugment(32, mode="exact", device_aug=True, device_resize=True)
