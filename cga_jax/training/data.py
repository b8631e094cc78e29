"""Input pipeline on Grain: random-access sources, per-record decode/augment, per-process shards.

Records are dicts ``{"image": uint8 (H, W, 3), "label": int32, "valid": int32}``. Images that
cannot be decoded (corrupt or truncated files) come back as a black image with ``valid=0``: the
loss and the accuracy ignore them and the trainer counts them, so a bad file never stops a run
and batch shapes stay fixed. Grayscale, palette and CMYK files are converted to RGB.

Training: ``grain.DataLoader`` with an ``IndexSampler`` (shuffled, endless, sharded by JAX
process), or :class:`~cga_jax.training.sampler.RepeatAugSampler` for repeated augmentation -- its
iterator state (a few bytes) is checkpointed, so a resumed run sees the same batches. Augmentation
(crop, flip, RandAugment, the random-erasing box) draws only from Grain's per-record rng.
Evaluation: every image exactly once; each process takes ``i % num_processes == pid`` and the last
batch is padded with ``valid=0`` records (the same number of batches on every process).
"""

from __future__ import annotations

import io
import math
import os

import grain.python as grain
import numpy as np
from PIL import Image

from cga_jax.preprocess import decode_image, eval_preprocess, list_image_folder
from cga_jax.training.arrayrecord import ArrayRecordSource, is_shard_dir
from cga_jax.training.device_resize import blank_crop, box_canvas, canvas_shape
from cga_jax.training.erasing import erase_box
from cga_jax.training.fast_decode import decode_crop, open_image
from cga_jax.training.ra_params import encode_ops
from cga_jax.training.randaugment import RandAugment
from cga_jax.training.sampler import RepeatAugSampler
from cga_jax.training.tar_source import TarSource

SOURCES = ("folder", "tar", "arrayrecord", "digits")  # data.name
DECODE_MODES = ("exact", "fast")  # data.decode
AUG_MODES = ("rrc_flip", "none")  # data.aug: random-resized-crop + flip, or resize only


# ---- sources ---------------------------------------------------------------------------------
class DigitsSource(grain.RandomAccessDataSource):
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), bicubic-upscaled to
    ``size`` px RGB. A fixed seeded split: ``val_size`` images held out for validation."""

    def __init__(self, split: str, size: int = 32, val_size: int = 360, seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.RandomState(seed).permutation(len(d.target))
        idx = order[val_size:] if split == "train" else order[:val_size]
        imgs = (d.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
        self.images = np.stack(
            [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in imgs]
        )[..., None].repeat(3, axis=-1)
        self.labels = d.target[idx].astype(np.int32)
        self.num_classes = 10
        self._desc = f"DigitsSource({split!r}, size={size}, n={len(idx)}, seed={seed})"

    def __repr__(self) -> str:  # Grain compares it when a checkpointed iterator is restored
        return self._desc

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class FolderSource(grain.RandomAccessDataSource):
    """ImageNet-style ``root/<class>/<image>``; classes sorted by name. Records hold the path;
    decoding happens in the workers (:class:`Decode`)."""

    def __init__(self, root: str | os.PathLike):
        self.samples, self.classes = list_image_folder(root)
        self.num_classes = len(self.classes)

    def __repr__(self) -> str:
        # Grain checks this on resume; no path, so a dataset moved to another disk still resumes
        return f"FolderSource({len(self.samples)} images, {self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return {"path": path, "label": np.int32(label)}


class Decode(grain.MapTransform):
    def map(self, r):
        if "image" in r:
            return {"image": r["image"], "label": r["label"], "valid": np.int32(1)}
        img = decode_image(io.BytesIO(r["bytes"]) if "bytes" in r else r["path"])
        if img is None:
            return {
                "image": np.zeros((8, 8, 3), np.uint8),
                "label": r["label"],
                "valid": np.int32(0),
            }
        return {"image": img, "label": r["label"], "valid": np.int32(1)}


# ---- transforms ------------------------------------------------------------------------------
def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale, ratio):
    """timm/torchvision ``RandomResizedCrop.get_params``: (top, left, height, width)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class TrainAugment(grain.RandomMapTransform):
    """Random-resized-crop (bicubic) to ``size`` and horizontal flip (``flip`` prob.); with
    ``scale=None`` only resizes (the digits demo, where flips and crops would change the digit).
    Then, as timm's train transform: ``randaugment`` (a :class:`RandAugment`, on the PIL image),
    and with ``reprob > 0`` a random-erasing box in ``r["erase"]`` (int32 (4,), applied after
    normalisation on the device, :mod:`cga_jax.training.erasing`). All randomness from ``rng``.

    ``mode="exact"`` takes decoded records (after :class:`Decode`) and resamples the box from the
    full image, as timm; ``"fast"`` takes encoded records (``path`` / ``bytes``) and decodes
    only as much as the box needs (:mod:`cga_jax.training.fast_decode`; decoded records take
    the exact path). ``device_aug=True`` leaves the flip and RandAugment to the train step
    (:mod:`cga_jax.training.device_augment`): the same draws are shipped as ``r["flip"]``
    int32 and ``r["ra"]`` float32 (L, 9). ``device_resize=True`` (with ``mode="fast"`` and
    ``device_aug``) leaves the resample of the box to the step as well: ``r["image"]`` is then
    the decoded box in a uint8 canvas (:func:`~cga_jax.training.device_resize.canvas_shape`)
    and ``r["crop"]`` float32 (7,) says where (:mod:`cga_jax.training.device_resize`). Every mode makes the same draws in the same order,
    so for one record rng the box, flip, ops and erasing box are the same."""

    def __init__(
        self,
        size: int,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip: float = 0.5,
        randaugment: RandAugment | None = None,
        reprob: float = 0.0,
        mode: str = "exact",
        device_aug: bool = False,
        device_resize: bool = False,
    ):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be 'exact' or 'fast', got {mode!r}")
        if device_resize and not (mode == "fast" and device_aug and scale is not None):
            raise ValueError("device_resize needs mode='fast', device_aug=True and a crop scale")
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.randaugment, self.reprob = randaugment, reprob
        self.mode, self.device_aug, self.device_resize = mode, device_aug, device_resize
        self.canvas = canvas_shape(size, ratio) if device_resize else None

    def _canvas(self, r, rng: np.random.Generator):
        """-> (uint8 canvas (Hc, Wc, 3), float32 crop (7,), valid): the box, not resampled."""
        try:
            if "image" in r:
                if not r.get("valid", 1):
                    raise ValueError("unreadable")
                im = Image.fromarray(r["image"])
            else:
                im = open_image(r["bytes"] if "bytes" in r else r["path"])
            w, h = im.size
            t, left, ch, cw = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
            return *box_canvas(im, t, left, ch, cw, self.size, self.canvas), np.int32(1)
        except Exception:  # noqa: BLE001 - unreadable: black, counted, as Decode does
            return np.zeros((*self.canvas, 3), np.uint8), blank_crop(), np.int32(0)

    def _crop(self, r, rng: np.random.Generator):
        """-> (uint8 (size, size, 3) or smaller/unchanged for scale=None, valid)."""
        if "image" not in r:  # fast mode: the box from the header, then a reduced decode
            try:
                im = open_image(r["bytes"] if "bytes" in r else r["path"])
                w, h = im.size
                t, left, ch, cw = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
                return decode_crop(im, t, left, ch, cw, self.size), np.int32(1)
            except Exception:  # noqa: BLE001 - unreadable: black, counted, as Decode does
                return np.zeros((self.size, self.size, 3), np.uint8), np.int32(0)
        img = r["image"]
        h, w = img.shape[:2]
        if self.scale is not None:
            t, left, ch, cw = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
            box = (left, t, left + cw, t + ch)
        else:
            box = (0, 0, w, h)
        if box != (0, 0, w, h) or (h, w) != (self.size, self.size):
            pil = Image.fromarray(img).resize((self.size, self.size), Image.BICUBIC, box=box)
            img = np.asarray(pil)
        return img, r.get("valid", np.int32(1))

    def random_map(self, r, rng: np.random.Generator):
        out = {"label": r["label"]}
        if self.device_resize:
            img, out["crop"], valid = self._canvas(r, rng)
            hw = (self.size, self.size)  # what the step resizes the box to
        else:
            img, valid = self._crop(r, rng)
            hw = img.shape[:2]
        out["valid"] = valid
        do_flip = self.flip > 0 and rng.uniform() < self.flip
        if self.device_aug:
            out["flip"] = np.int32(do_flip)
            if self.randaugment is not None:
                ops = self.randaugment.draw(rng)
                n = self.randaugment.cfg.num_layers
                out["ra"] = encode_ops(ops, hw[0], hw[1], n)
        else:
            if do_flip:
                img = img[:, ::-1]
            if self.randaugment is not None:
                pil = Image.fromarray(np.ascontiguousarray(img))
                img = np.asarray(self.randaugment(pil, rng))
        out["image"] = np.ascontiguousarray(img)
        if self.reprob > 0:
            out["erase"] = np.asarray(erase_box(rng, *hw, prob=self.reprob), np.int32)
        return out


class EvalTransform(grain.MapTransform):
    """The official evaluation transform (:func:`cga_jax.preprocess.eval_preprocess`): bicubic
    resize of the short side to ``floor(size / crop_pct)``, centre crop ``size``, exactly as
    torchvision rounds (``cga-jax eval`` uses the same function)."""

    def __init__(self, size: int, crop_pct: float = 0.875):
        self.size, self.crop_pct = size, crop_pct

    def map(self, r):
        return {**r, "image": eval_preprocess(r["image"], self.size, self.crop_pct)}


# ---- loaders ---------------------------------------------------------------------------------
def make_source(cfg, split: str):
    """The ``split`` ("train" or "val") source of ``cfg.data``: the digits, a tar source
    (``data.name="tar"`` or a ``<split>_dir`` ending in ``.tar``) or a class-folder source."""
    d = cfg.data
    if d.name == "digits":
        return DigitsSource(split, size=cfg.img_size, seed=d.split_seed)
    path = os.path.join(d.root, d.train_dir if split == "train" else d.val_dir)
    if d.name == "tar" or path.endswith(".tar"):
        return TarSource(path)
    if d.name == "arrayrecord" or is_shard_dir(path):
        return ArrayRecordSource(path)
    return FolderSource(path)


def train_loader(cfg, source, process_index: int, process_count: int, seed: int):
    """Endless shuffled loader of per-process batches of ``batch_size // process_count``.

    ``data.aug`` (crop and flip), ``data.randaugment`` (a ``rand-...`` string, "" for none),
    ``data.reprob`` (random erasing) and ``data.repeated_aug`` (> 1: :class:`RepeatAugSampler`)
    follow timm / DeiT; ``data.decode`` ("exact" / "fast"), ``data.device_aug`` and
    ``data.device_resize`` pick the :class:`TrainAugment` mode; ``data.workers`` Grain worker processes, ``data.read_threads``
    record-reading threads."""
    local_batch = cfg.batch_size // process_count
    d = cfg.data
    scale = None if d.aug == "none" else tuple(d.rrc_scale)
    flip = 0.0 if scale is None else d.hflip
    shard = grain.ShardOptions(process_index, process_count, drop_remainder=True)
    if d.repeated_aug > 1:
        sampler = RepeatAugSampler(len(source), shard, repeats=d.repeated_aug, seed=seed)
    else:
        sampler = grain.IndexSampler(
            num_records=len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=seed
        )
    ra = RandAugment(d.randaugment, interpolation=d.interpolation) if d.randaugment else None
    aug = TrainAugment(
        cfg.img_size,
        scale=scale,
        flip=flip,
        randaugment=ra,
        reprob=d.reprob,
        mode=d.decode,
        device_aug=d.device_aug,
        device_resize=d.device_resize,
    )
    decode = [] if d.decode == "fast" and scale is not None else [Decode()]
    ops = [*decode, aug, grain.Batch(local_batch, drop_remainder=True)]
    # Records are paths or a few KB of bytes, decoded in the transforms (which run in the
    # worker processes): read them in the calling thread. Grain's default read-ahead (16
    # threads, 500 records) scans its whole buffer on every record, which cost more CPU than
    # decoding here; ``data.read_threads`` > 0 brings it back for slow (remote) storage.
    read = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=4 * d.read_threads)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=ops,
        worker_count=d.workers,
        read_options=read,
    )


def eval_batches(cfg, source, process_index: int, process_count: int):
    """Yields per-process batches covering every record exactly once (padding has valid=0)."""
    local_batch = cfg.eval_batch_size // process_count
    n = len(source)
    num_batches = math.ceil(n / (local_batch * process_count))
    tf = EvalTransform(cfg.img_size, cfg.data.crop_pct)
    decode = Decode()
    ds = grain.MapDataset.range(num_batches * local_batch * process_count)
    ds = ds[process_index::process_count]

    def load(i):
        if i < n:
            return tf.map(decode.map(source[i]))
        return {
            "image": np.zeros((cfg.img_size, cfg.img_size, 3), np.uint8),
            "label": np.int32(0),
            "valid": np.int32(0),
        }

    ds = ds.map(load).batch(local_batch, drop_remainder=True)
    it = ds.to_iter_dataset()
    if cfg.data.workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers))
    yield from it
