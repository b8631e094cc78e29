"""``fast`` random-resized-crop (reduced JPEG decode of the box) against ``exact``."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cga_jax.training import data as data_lib
from cga_jax.training import fast_decode as fd
from cga_jax.training.randaugment import RandAugment
from cga_jax.training.recipe import imagenet_recipe


def _jpeg(seed: int, size=(190, 150)) -> bytes:
    """A smooth, structured JPEG (quality 90)."""
    from bench.input_data import synth_image

    img = synth_image(seed, size_range=(min(size), max(size)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_dct_scale_keeps_the_box_at_least_the_target():
    assert fd.dct_scale(223, 500, 224) == 1
    assert fd.dct_scale(448, 460, 224) == 2
    assert fd.dct_scale(447, 460, 224) == 1
    assert fd.dct_scale(900, 1000, 224) == 4
    assert fd.dct_scale(5000, 4000, 224) == 8
    for h, w in np.random.default_rng(0).integers(1, 3000, (200, 2)):
        s = fd.dct_scale(h, w, 224)
        assert s in fd.DCT_SCALES and (s == 1 or min(h, w) / s >= 224)


def test_decode_crop_decodes_small_and_stays_close():
    """A box 4x the target decodes at 1/4 (the image is 1/4 size after load) and the crop is
    within 35 dB PSNR of the full decode + bicubic resample of the same box."""
    data = _jpeg(3, (600, 600))
    im = fd.open_image(data)
    w, h = im.size
    top, left, bh, bw = 10, 20, h - 30, w - 40
    size = min(bh, bw) // 4
    got = fd.decode_crop(im, top, left, bh, bw, size)
    assert im.size == (-(-w // 4), -(-h // 4))  # decoded at 1/4
    full = Image.open(io.BytesIO(data)).convert("RGB")
    want = np.asarray(
        full.resize((size, size), Image.BICUBIC, box=(left, top, left + bw, top + bh))
    )
    assert got.shape == want.shape == (size, size, 3)
    assert _psnr(got, want) > 35
    assert np.abs(got.astype(int) - want).mean() < 2.0


def _records(n: int):
    return [{"bytes": _jpeg(s), "label": np.int32(s % 3)} for s in range(n)]


@pytest.mark.parametrize("device_aug", [False, True])
def test_fast_draws_what_exact_draws(monkeypatch, device_aug):
    """Same record rng -> the same crop boxes (recorded), flips, RandAugment ops and erasing
    boxes in both modes; the pixels stay a faithful crop of the same region."""
    boxes = {"exact": [], "fast": []}
    real = data_lib.random_resized_crop_box
    mode = ["exact"]

    def spy(*a, **k):
        out = real(*a, **k)
        boxes[mode[0]].append(out)
        return out

    monkeypatch.setattr(data_lib, "random_resized_crop_box", spy)
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    kw = dict(randaugment=ra, reprob=0.25, device_aug=device_aug)
    exact = data_lib.TrainAugment(32, mode="exact", **kw)
    fast = data_lib.TrainAugment(32, mode="fast", **kw)
    dec = data_lib.Decode()
    psnrs = []
    for i, r in enumerate(_records(12)):
        mode[0] = "exact"
        a = exact.random_map(dec.map(r), np.random.default_rng(i))
        mode[0] = "fast"
        b = fast.random_map(r, np.random.default_rng(i))
        assert a.keys() == b.keys()
        for k in a:
            if k != "image":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        psnrs.append(_psnr(a["image"], b["image"]))
    assert boxes["exact"] == boxes["fast"] and len(boxes["fast"]) == 12
    if device_aug:  # no RandAugment on the host: the crops themselves are compared
        assert np.median(psnrs) > 35, psnrs


def test_fast_loader_skips_bad_files_and_resumes(tmp_path):
    root = tmp_path / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(6):
        (root / "ab"[i % 2] / f"{i}.jpg").write_bytes(_jpeg(i))
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage" * 20)
    trunc = _jpeg(9)
    (root / "a" / "trunc.jpg").write_bytes(trunc[: len(trunc) // 2])
    cfg = imagenet_recipe()
    cfg.img_size, cfg.batch_size = 24, 8
    cfg.data.update(dict(workers=0, decode="fast", device_aug=True, reprob=0.0, repeated_aug=1))
    cfg.data.device_resize = False  # the host resamples the box (tests/test_device_resize.py)
    cfg.data.randaugment = "rand-m9-mstd0.5-inc1"
    loader = data_lib.train_loader(cfg, data_lib.FolderSource(root), 0, 1, seed=0)
    it = iter(loader)
    b = next(it)
    assert b["image"].shape == (8, 24, 24, 3) and b["ra"].shape == (8, 2, 9)
    assert b["flip"].shape == (8,)
    assert int((1 - b["valid"]).sum()) == 2
    state = it.get_state()
    nxt = next(it)
    it2 = iter(loader)
    it2.set_state(state)
    again = next(it2)
    for k in nxt:
        np.testing.assert_array_equal(again[k], nxt[k])


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="decode mode"):
        data_lib.TrainAugment(32, mode="turbo")
