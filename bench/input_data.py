"""Deterministic ImageNet-sized JPEGs for the input-pipeline benchmark (no download).

Each image has a side of 375-640 px per axis and photo-like structure rather than white noise:
a multi-octave value-noise field (coarse shapes down to 1-px texture: about 3 bits per pixel at quality 90, in the
range of ImageNet's photographs), a few hard-edged ellipses and bars, colour from a
random 3x3 mix. Written at JPEG quality 90 (4:2:0, Pillow's defaults) into an ImageNet-style
``root/<class>/<image>.jpg`` folder.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageDraw


def _value_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) float32 in about [-1, 1]: bilinearly upsampled random grids, 1/f amplitudes."""
    out = np.zeros((h, w), np.float32)
    for cell, amp in ((96, 1.0), (24, 0.6), (6, 0.5), (2, 0.5), (1, 0.35)):
        gh, gw = h // cell + 2, w // cell + 2
        grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((gw * cell, gh * cell), Image.BILINEAR)
        out += amp * np.asarray(up)[:h, :w]
    return out / 2.95


def synth_image(seed: int, size_range: tuple[int, int] = (375, 640)) -> Image.Image:
    """One RGB image, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    fields = np.stack([_value_noise(rng, h, w) for _ in range(3)], -1)  # (h, w, 3)
    mix = rng.uniform(-0.6, 1.0, (3, 3)).astype(np.float32)
    img = 128 + 90 * fields @ mix.T + rng.uniform(-40, 40, 3)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y0 + int(rng.integers(4, 30))), fill=color)
    # texture over the shapes too, so flat fills do not compress unrealistically well
    tex = 25 * _value_noise(rng, h, w)[..., None]
    return Image.fromarray((np.asarray(pil) + tex).clip(0, 255).astype(np.uint8))


def make_folder(root: str | pathlib.Path, n: int = 512, classes: int = 8, seed: int = 0):
    """Write ``n`` JPEGs (quality 90) to ``root/c<k>/<i>.jpg``; -> (root, total bytes, pixels).
    Files already there are kept (the content is a function of ``seed`` and the index)."""
    root = pathlib.Path(root)
    nbytes = npix = 0
    for i in range(n):
        d = root / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:05d}.jpg"
        if not path.exists():
            synth_image(seed * 1_000_003 + i).save(path, quality=90)
        with Image.open(path) as im:
            npix += im.size[0] * im.size[1]
        nbytes += path.stat().st_size
    return root, nbytes, npix
