"""ArrayRecord shards of an image folder: ``cga-jax pack`` writes them, :class:`ArrayRecordSource`
reads them like a folder.

Layout of ``out/``: ``<split>-00000-of-0000N.array_record`` shards and ``meta.json`` (classes,
records per shard, format version). A record is ``label`` (int32, little endian) followed by the
encoded image bytes: no pickle, nothing executed on read. Each shard is written to a temporary
name in the same directory and renamed when complete, and ``meta.json`` is written (the same way)
last, so a failed or interrupted pack leaves no half-written shard and no readable dataset.

Every image is decoded once at pack time: files that do not decode in full are reported and
left out. ``resize_short`` re-encodes images whose shorter side is larger (bicubic, JPEG
``quality``), once, so training decodes fewer pixels; without it the bytes are copied as they are.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import sys

import numpy as np
from PIL import Image

from cga_jax.checkpoint_io import atomic_write
from cga_jax.preprocess import decode_image, list_image_folder

FORMAT = "cga_jax.arrayrecord/1"
SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access


def encode_record(label: int, data: bytes) -> bytes:
    return struct.pack("<i", label) + data


def decode_record(rec: bytes) -> tuple[int, bytes]:
    return struct.unpack_from("<i", rec)[0], rec[4:]


def _image_bytes(path: str, resize_short: int | None, quality: int) -> bytes | None:
    """The bytes to store for one image, or None if it does not decode in full."""
    img = decode_image(path)
    if img is None:
        return None
    h, w = img.shape[:2]
    if resize_short is None or min(h, w) <= resize_short:
        return pathlib.Path(path).read_bytes()
    s = resize_short / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    buf = io.BytesIO()
    Image.fromarray(img).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_shards: int,
    resize_short: int | None = None,
    quality: int = 90,
    split: str = "train",
    log=print,
) -> dict:
    """Pack the ImageNet-style folder ``src`` (``<class>/<image>``) into ``num_shards`` shards
    in ``out``. Record ``i`` of the folder's sorted listing goes to shard ``i % num_shards``.
    Returns the metadata written to ``out/meta.json`` (plus ``skipped``: the unreadable files)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if resize_short is not None and resize_short < 1:
        raise ValueError(f"--resize-short must be >= 1, got {resize_short}")
    samples, classes = list_image_folder(src)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    counts = []
    names = [f"{split}-{k:05d}-of-{num_shards:05d}{SUFFIX}" for k in range(num_shards)]
    for k, name in enumerate(names):

        def write(tmp: str, k: int = k) -> None:
            w = ArrayRecordWriter(tmp, WRITER_OPTIONS)
            n = 0
            try:
                for path, label in samples[k::num_shards]:
                    data = _image_bytes(path, resize_short, quality)
                    if data is None:
                        skipped.append(path)
                        log(f"skipped (does not decode): {path}")
                        continue
                    w.write(encode_record(label, data))
                    n += 1
            finally:
                w.close()
            counts.append(n)

        atomic_write(str(out / name), write)
        log(f"wrote {out / name} ({counts[-1]} images)")
    meta = {
        "format": FORMAT,
        "split": split,
        "classes": classes,
        "shards": names,
        "records": counts,
        "resize_short": resize_short,
    }

    def write_meta(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(str(out / "meta.json"), write_meta)
    return {**meta, "skipped": skipped}


def is_shard_dir(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    return p.is_dir() and (p / "meta.json").is_file() and any(p.glob(f"*{SUFFIX}"))


class ArrayRecordSource:
    """Records ``{"bytes": encoded image, "label": int32}`` of a :func:`pack` output directory;
    decoding is :class:`~cga_jax.training.data.Decode`'s (or the fast crop's) job. A Grain
    random-access source (Grain is imported here: ``cga-jax pack`` works without it)."""

    def __init__(self, root: str | os.PathLike):
        root = pathlib.Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root}: no meta.json (write shards with `cga-jax pack`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        paths = [root / n for n in meta["shards"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: shards listed in meta.json are missing: {missing}")
        self.classes = list(meta["classes"])
        self.num_classes = len(self.classes)
        import grain.python as grain  # optional dependency (the train extra)

        self._source = grain.ArrayRecordDataSource([str(p) for p in paths])
        if len(self._source) != sum(meta["records"]):
            raise ValueError(
                f"{root}: shards hold {len(self._source)} records, meta.json says "
                f"{sum(meta['records'])}"
            )

    def __repr__(self) -> str:  # Grain checks it on resume; no path (a moved dataset resumes)
        return f"ArrayRecordSource({len(self)} images, {self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        label, data = decode_record(self._source[i])
        return {"bytes": data, "label": np.int32(label)}


def main_pack(src: str, out: str, num_shards: int, resize_short: int | None, quality: int) -> int:
    meta = pack(src, out, num_shards, resize_short, quality)
    n, bad = sum(meta["records"]), len(meta["skipped"])
    print(f"packed {n} images of {len(meta['classes'])} classes into {num_shards} shards in {out}")
    if bad:
        print(f"skipped {bad} unreadable file(s) (listed above)", file=sys.stderr)
    return 0
