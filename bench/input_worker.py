"""One input-pipeline contestant in its own process (``python -m bench.input_worker SPEC``).

Protocol (one JSON line per reply on stdout): after start-up and a warm-up batch it prints
``{"ready": ...}``; each ``run`` line on stdin times ``images`` images (whole batches) and
replies ``{"seconds": s, "images": n}``; ``stop`` ends it. ``kind``: ``timm`` (timm's
``create_transform`` in a torch ``DataLoader``), ``decode`` (the JPEG decode alone, a ceiling),
``cga_jax`` (``train_loader`` with the spec's
``data`` keys over the ImageNet recipe's) or ``device`` (the jitted device-side part of one
batch: the resample of the crop boxes with ``data.device_resize``, flip + RandAugment +
normalise + erasing; ``run`` times ``iters`` calls).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _reply(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _patch_timm_posterize() -> None:
    """timm's PosterizeIncreasing reaches 0 bits at magnitude 10, which Pillow >= 12 rejects
    (timm then raises); give the black image older Pillow (and cga_jax) return."""
    from PIL import Image
    from timm.data import auto_augment as aa

    real = aa.posterize

    def posterize(img, bits, **kw):
        return Image.new(img.mode, img.size) if bits <= 0 else real(img, bits, **kw)

    aa.posterize = posterize
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in aa.NAME_TO_OP:
            aa.NAME_TO_OP[name] = posterize


def timm_batches(spec):
    import torch
    from timm.data import ImageDataset, create_transform

    torch.set_num_threads(1)
    _patch_timm_posterize()
    tf = create_transform(
        224,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.25,
        re_mode="pixel",
        interpolation="bicubic",
    )
    ds = ImageDataset(spec["root"], transform=tf)
    workers = spec["workers"]
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=spec["batch"],
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    while True:
        for x, _ in loader:
            yield len(x)


def _config(spec):
    """The ImageNet recipe at 224 px, batch ``spec["batch"]``, on ``spec["root"]``, no repeated
    augmentation, host augmentation unless ``spec["data"]`` says otherwise."""
    from cga_jax.training.recipe import imagenet_recipe

    cfg = imagenet_recipe()
    cfg.img_size, cfg.batch_size = 224, spec["batch"]
    cfg.data.update(
        dict(
            name="folder", root=spec["root"], repeated_aug=1, device_aug=False, device_resize=False
        )
    )
    cfg.data.update(spec["data"])
    return cfg


def cga_batches(spec):
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's worker processes read its absl flags
        flags.FLAGS.mark_as_parsed()

    from cga_jax.training import data as data_lib

    cfg = _config(spec)
    src = data_lib.make_source(cfg, "train")
    for b in data_lib.train_loader(cfg, src, 0, 1, seed=0):
        yield len(b["image"])


def decode_batches(spec):
    """The ceiling of any host pipeline that decodes JPEGs with Pillow: per image only what
    ``fast`` decodes (header, crop box, JPEG decode at the box's DCT scale), in file order."""
    import glob
    import warnings

    import numpy as np

    from cga_jax.training import fast_decode as fd
    from cga_jax.training.data import random_resized_crop_box

    files = sorted(glob.glob(os.path.join(spec["root"], "train", "*", "*.jpg")))
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")
    while True:
        for k in range(0, len(files) - spec["batch"] + 1, spec["batch"]):
            for f in files[k : k + spec["batch"]]:
                im = fd.open_image(f)
                w, h = im.size
                t, left, ch, cw = random_resized_crop_box(rng, h, w, (0.08, 1), (3 / 4, 4 / 3))
                s = fd.dct_scale(ch, cw, 224)
                if s > 1:
                    im.draft("RGB", (w // s, h // s))
                im.load()
            yield spec["batch"]


def device_step(spec):
    """A closure running the jitted device-side augmentation of one batch from the loader."""
    import jax
    import jax.numpy as jnp

    from cga_jax.preprocess import normalize
    from cga_jax.training import data as data_lib
    from cga_jax.training.device_augment import augment
    from cga_jax.training.device_resize import resize_crops
    from cga_jax.training.erasing import apply_erase

    cfg = _config(spec)
    batch = next(iter(data_lib.train_loader(cfg, data_lib.make_source(cfg, "train"), 0, 1, 0)))
    keys = ("image", "flip", "ra", "erase", "crop")
    batch = {k: jnp.asarray(batch[k]) for k in keys if k in batch}

    @jax.jit
    def step(b, key):
        images = resize_crops(b["image"], b["crop"], 224) if "crop" in b else b["image"]
        x = normalize(augment(dict(b, image=images)))
        return apply_erase(key, x, b["erase"])

    key = jax.random.key(0)
    step(batch, key).block_until_ready()

    def run():
        step(batch, key).block_until_ready()
        return spec["batch"]

    return run


def fidelity(spec) -> dict:
    """fast vs exact crops of the same boxes (PSNR, mean abs diff), and each device op vs PIL
    (mean abs diff per op at magnitudes 0..10, on 224 px crops of the benchmark images)."""
    import glob
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from cga_jax.preprocess import decode_image
    from cga_jax.training import device_augment as da
    from cga_jax.training import device_resize as dr
    from cga_jax.training import fast_decode as fd
    from cga_jax.training import randaugment as ra
    from cga_jax.training.data import random_resized_crop_box

    files = sorted(glob.glob(os.path.join(spec["root"], "train", "*", "*.jpg")))
    mads, psnrs, scaled = [], [], []
    crops = []
    for i, f in enumerate(files):
        img = decode_image(f)
        h, w = img.shape[:2]
        t, left, ch, cw = random_resized_crop_box(
            np.random.default_rng(i), h, w, (0.08, 1), (3 / 4, 4 / 3)
        )
        box = (left, t, left + cw, t + ch)
        want = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC, box=box))
        got = fd.decode_crop(fd.open_image(f), t, left, ch, cw, 224)
        d = want.astype(np.float64) - got
        mse = float(np.mean(d**2))
        mads.append(float(np.abs(d).mean()))
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
        scaled.append(fd.dct_scale(ch, cw, 224) > 1)
        if len(crops) < 16:
            crops.append(want)
    # device_resize: the canvas resampled by the device vs Pillow's resize of the same box of
    # the image decoded at the same DCT scale (the fast path without reducing_gap), and vs exact
    canvas, resize = dr.canvas_shape(224), jax.jit(dr.resize_crops, static_argnums=2)
    dr_pil, dr_exact, transposed = [], [], []
    for i, f in enumerate(files[:64]):
        im = fd.open_image(f)
        w, h = im.size
        t, left, ch, cw = random_resized_crop_box(
            np.random.default_rng(i), h, w, (0.08, 1), (3 / 4, 4 / 3)
        )
        can, crop = dr.box_canvas(im, t, left, ch, cw, 224, canvas)
        got = np.asarray(resize(can[None], crop[None], 224))[0].astype(np.float64)
        s = fd.dct_scale(ch, cw, 224)
        ref = fd.open_image(f)
        if s > 1:
            ref.draft("RGB", (w // s, h // s))
        box = (left / s, t / s, (left + cw) / s, (t + ch) / s)
        pil = np.asarray(ref.convert("RGB").resize((224, 224), Image.BICUBIC, box=box))
        full = Image.fromarray(decode_image(f))
        box = (left, t, left + cw, t + ch)
        exact = np.asarray(full.resize((224, 224), Image.BICUBIC, box=box))
        dr_pil.append(float(np.abs(got - pil).mean()))
        dr_exact.append(float(np.abs(got - exact).mean()))
        transposed.append(bool(crop[6]))
    tr = np.array(transposed)
    sc = np.array(scaled)
    fin = [p for p, s in zip(psnrs, scaled, strict=True) if s]
    out = dict(
        n=len(files),
        scaled_share=float(sc.mean()),
        mad_all=float(np.mean(mads)),
        mad_scaled=float(np.mean(np.array(mads)[sc])) if sc.any() else 0.0,
        psnr_scaled_median=float(np.median(fin)) if fin else None,
        psnr_scaled_min=float(np.min(fin)) if fin else None,
    )
    out["device_resize"] = dict(
        n=len(dr_pil),
        canvas=list(canvas),
        bytes_per_image=int(np.prod(canvas) * 3 + 7 * 4),
        mad_vs_pil_same_scale=float(np.mean(dr_pil)),
        mad_vs_pil_upright=float(np.mean(np.array(dr_pil)[~tr])) if (~tr).any() else 0.0,
        mad_vs_pil_transposed=float(np.mean(np.array(dr_pil)[tr])) if tr.any() else 0.0,
        max_image_mad_vs_pil=float(np.max(dr_pil)),
        transposed_share=float(tr.mean()),
        mad_vs_exact=float(np.mean(dr_exact)),
    )
    imgs = np.stack(crops)
    fn = jax.jit(da.randaugment)
    ops = {}
    for name in ra.INCREASING_OPS:
        worst = 0.0
        for m in (0.0, 2.0, 4.0, 6.0, 8.0, 9.0, 10.0):
            for neg in (False, True):
                arg = ra.level_to_arg(name, m, neg)
                pil = np.stack(
                    [np.asarray(ra.apply_op(Image.fromarray(x), name, arg)) for x in imgs]
                )
                p = np.stack([da.encode_ops([(name, arg, "bicubic")], 224, 224, 1) for _ in imgs])
                dev = np.asarray(fn(jnp.asarray(imgs), jnp.asarray(p)))
                worst = max(worst, float(np.abs(dev.astype(int) - pil).mean()))
        ops[name] = worst
    out["device_ops_worst_mad"] = ops
    return out


def main(spec: dict) -> None:
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    if spec["kind"] == "fidelity":
        _reply(ready=True)
        for line in sys.stdin:
            if line.strip() == "stop":
                break
            _reply(seconds=1.0, images=0, fidelity=fidelity(spec))
        return
    if spec["kind"] == "device":
        call = device_step(spec)
        call()
        _reply(ready=True)
        for line in sys.stdin:
            if line.strip() == "stop":
                break
            t0, n = time.perf_counter(), 0
            for _ in range(spec["iters"]):
                n += call()
            _reply(seconds=time.perf_counter() - t0, images=n)
        return
    kinds = dict(timm=timm_batches, cga_jax=cga_batches, decode=decode_batches)
    gen = kinds[spec["kind"]](spec)
    next(gen)  # warm-up: workers started, first files read
    _reply(ready=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        t0, n = time.perf_counter(), 0
        while n < spec["images"]:
            n += next(gen)
        _reply(seconds=time.perf_counter() - t0, images=n)


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception:  # the parent reports it
        _reply(error=traceback.format_exc())
        raise
    os._exit(0)  # loader worker processes and threads must not hold the exit
