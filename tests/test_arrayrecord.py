"""ArrayRecord shards: pack (bad images skipped, nothing half-written), read like the folder,
exact resume of a training loader on shards, the CLI."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from cga_jax import cli
from cga_jax.training import arrayrecord as ar
from cga_jax.training import data as data_lib
from cga_jax.training.recipe import imagenet_recipe


def _jpeg(seed: int, h: int, w: int) -> bytes:
    rng = np.random.RandomState(seed)
    small = (rng.rand(4, 5, 3) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "src"
    for c in ("cat", "dog", "eel"):
        (root / c).mkdir(parents=True)
    for i in range(9):
        (root / ("cat", "dog", "eel")[i % 3] / f"{i}.jpg").write_bytes(_jpeg(i, 40 + i, 60 - i))
    (root / "dog" / "corrupt.jpg").write_bytes(b"definitely not a jpeg" * 5)
    good = _jpeg(99, 50, 50)
    (root / "eel" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def _decoded(src):
    dec = data_lib.Decode()
    return sorted(
        (int(r["label"]), r["image"].tobytes())
        for r in (dec.map(src[i]) for i in range(len(src)))
        if r["valid"]
    )


def test_pack_reads_like_the_folder_and_reports_bad_files(folder, tmp_path):
    logs = []
    meta = ar.pack(folder, tmp_path / "shards", 3, log=logs.append)
    assert sorted(p.rsplit("/", 1)[-1] for p in meta["skipped"]) == ["corrupt.jpg", "truncated.jpg"]
    assert sum("skipped" in m for m in logs) == 2 and sum(meta["records"]) == 9
    src = ar.ArrayRecordSource(tmp_path / "shards")
    assert src.classes == ["cat", "dog", "eel"] and len(src) == 9
    assert "shards" not in repr(src)  # no path: a moved dataset still resumes
    assert _decoded(pickle.loads(pickle.dumps(src))) == _decoded(data_lib.FolderSource(folder))
    assert ar.is_shard_dir(tmp_path / "shards") and not ar.is_shard_dir(folder)


def test_resize_short_reencodes_once(folder, tmp_path):
    ar.pack(folder, tmp_path / "small", 2, resize_short=30)
    src = ar.ArrayRecordSource(tmp_path / "small")
    for i in range(len(src)):
        with Image.open(io.BytesIO(src[i]["bytes"])) as im:
            assert min(im.size) == 30 and im.format == "JPEG"


def test_failed_pack_leaves_no_partial_shard(folder, tmp_path, monkeypatch):
    real, calls = ar._image_bytes, []

    def flaky(path, *a):
        calls.append(path)
        if len(calls) == 8:  # shard 0 has 6 of the 11 files: in the middle of shard 1
            raise OSError("disk full")
        return real(path, *a)

    monkeypatch.setattr(ar, "_image_bytes", flaky)
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="disk full"):
        ar.pack(folder, out, 2)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["train-00000-of-00002.array_record"], names  # the finished one only
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ar.ArrayRecordSource(out)
    monkeypatch.setattr(ar, "_image_bytes", real)
    ar.pack(folder, out, 2)  # a rerun completes
    assert len(ar.ArrayRecordSource(out)) == 9


def test_training_loader_on_shards_resumes_exactly(folder, tmp_path):
    ar.pack(folder, tmp_path / "ds" / "train", 2)
    cfg = imagenet_recipe()
    cfg.img_size, cfg.batch_size = 16, 4
    cfg.data.update(dict(root=str(tmp_path / "ds"), workers=0, decode="fast", reprob=0.25))
    cfg.data.update(dict(randaugment="", repeated_aug=1, device_aug=False, device_resize=False))
    src = data_lib.make_source(cfg, "train")  # detected from the directory
    assert isinstance(src, ar.ArrayRecordSource)
    it = iter(data_lib.train_loader(cfg, src, 0, 1, seed=3))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = iter(data_lib.train_loader(cfg, ar.ArrayRecordSource(tmp_path / "ds" / "train"), 0, 1, 3))
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_cli_pack(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["pack", "--src", str(folder), "--out", str(out), "--num-shards", "2"]) == 0
    assert "packed 9 images of 3 classes into 2 shards" in capsys.readouterr().out
    rc = cli.main(["pack", "--src", str(tmp_path / "nope"), "--out", str(out), "--num-shards", "2"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    rc = cli.main(["pack", "--src", str(folder), "--out", str(out), "--num-shards", "0"])
    assert rc == 2 and "--num-shards" in capsys.readouterr().err
