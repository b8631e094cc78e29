"""Input pipeline: bad images are converted or skipped and counted; eval covers every image once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cga_jax.training import data as data_lib
from cga_jax.training.recipe import digits


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds" / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    rgb = (np.random.RandomState(0).rand(20, 24, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "a/rgb.png")
    Image.fromarray(rgb[..., 0]).save(root / "a/gray.png")  # L
    Image.fromarray(rgb).convert("CMYK").save(root / "b/cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(root / "b/palette.png")
    full = (root / "a/rgb.png").read_bytes()
    (root / "b/truncated.png").write_bytes(full[: len(full) // 2])
    (root / "b/corrupt.jpg").write_bytes(b"not an image at all" * 10)
    return root


def test_bad_images_converted_or_skipped(folder):
    src = data_lib.FolderSource(folder)
    assert src.classes == ["a", "b"] and len(src) == 6
    out = {r["path"].split("/")[-1]: data_lib.Decode().map(r) for r in (src[i] for i in range(6))}
    for name in ("rgb.png", "gray.png", "cmyk.jpg", "palette.png"):
        assert out[name]["valid"] == 1 and out[name]["image"].shape == (20, 24, 3), name
        assert out[name]["image"].dtype == np.uint8
    assert out["truncated.png"]["valid"] == 0 and out["corrupt.jpg"]["valid"] == 0


def test_train_loader_keeps_going_and_counts(folder):
    cfg = digits()
    cfg.img_size, cfg.batch_size = 16, 6
    cfg.data.update(aug="rrc_flip", hflip=0.5)
    loader = data_lib.train_loader(cfg, data_lib.FolderSource(folder), 0, 1, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]  # 3 epochs of 6 images
    for b in batches:
        assert b["image"].shape == (6, 16, 16, 3)
        assert int((1 - b["valid"]).sum()) == 2  # the two unreadable files, every epoch
    # iterator state round trip: the same next batch
    state = it.get_state()
    nxt = next(it)
    it2 = iter(loader)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["image"], nxt["image"])


def test_eval_covers_every_image_once():
    cfg = digits()
    cfg.img_size, cfg.eval_batch_size = 16, 8
    src = data_lib.DigitsSource("val", size=16, val_size=37)
    seen = []
    for pid in range(2):
        for b in data_lib.eval_batches(cfg, src, pid, 2):
            assert b["image"].shape == (4, 16, 16, 3)
            seen += [int(v) for v in b["valid"]]
    assert sum(seen) == 37 and len(seen) % 8 == 0


def test_tar_shards_read_like_the_folder(folder, tmp_path):
    """The same images in two tar shards: same classes, same decoded pixels, the same bad files
    skipped; the source survives pickling (Grain worker processes)."""
    import pickle
    import tarfile

    from cga_jax.training.tar_source import TarSource

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for k, part in enumerate((files[:3], files[3:])):
        with tarfile.open(shards / f"train-{k:04d}.tar", "w") as tf:
            tf.add(folder / "a", arcname="a", recursive=False)  # a directory member: skipped
            for f in part:
                tf.add(f, arcname=f"{f.parent.name}/{f.name}")
    (shards / "notes.txt").write_text("not a shard")
    src, ref = TarSource(shards), data_lib.FolderSource(folder)
    assert src.classes == ref.classes and len(src) == len(ref) == 6
    dec = data_lib.Decode()
    got = sorted(
        (int(r["label"]), int(r["valid"]), r["image"].tobytes())
        for r in (dec.map(pickle.loads(pickle.dumps(src))[i]) for i in range(len(src)))
    )
    want = sorted(
        (int(r["label"]), int(r["valid"]), r["image"].tobytes())
        for r in (dec.map(ref[i]) for i in range(len(ref)))
    )
    assert got == want and sum(v for _, v, _ in got) == 4
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        TarSource(tmp_path / "nowhere")
    bad = tmp_path / "gz.tar"
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(folder / "a/rgb.png", arcname="a/rgb.png")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        TarSource(bad)
