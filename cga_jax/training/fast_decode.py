"""Random-resized-crop straight from the encoded file: read the size, pick the box, decode small.

``exact`` mode decodes the whole image and resamples the crop box from it (what timm does).
:func:`decode_crop` gets the same box from the header size alone, then:

1. decodes at the smallest libjpeg DCT scale ``s`` in (8, 4, 2, 1) that keeps the box at least
   ``size`` px on both sides (``min(box h, box w) / s >= size``), so no pixel of the output is
   upsampled from less than the exact path sees (Pillow ``Image.draft``; other formats decode
   at full size);
2. resamples the box (divided by ``s``) to ``size`` x ``size`` with the same antialiased bicubic
   filter as the exact path; for a box still much larger than ``size`` Pillow first reduces
   by an integer factor (``reducing_gap``).

The result is a random-resized crop of the same region, filtered slightly differently (the
DCT scaling is a band-limited downsample), never a different augmentation; how far it is from
``exact`` is measured in docs/training.md. Pillow can decode neither a region nor with a
faster IDCT through its public API; a libjpeg-turbo binding that could was measured and is
not used (docs/training.md).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile

DCT_SCALES = (8, 4, 2, 1)
REDUCING_GAP = 3.0  # Pillow: "indistinguishable from fair resampling in most cases" at >= 3


def open_image(src: str | os.PathLike | bytes) -> Image.Image:
    """A lazily decoded PIL image (the header is read, the pixels are not)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return Image.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else src)


def dct_scale(box_h: float, box_w: float, size: int) -> int:
    """The largest DCT scale denominator that keeps the box >= ``size`` on both sides."""
    for s in DCT_SCALES:
        if min(box_h, box_w) >= s * size:
            return s
    return 1


def resize_box(im: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Bicubic (antialiased) resample of ``box`` = (left, top, right, bottom) of ``im`` to
    uint8 (size, size, 3)."""
    if im.mode != "RGB":
        im = im.convert("RGB")
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
    return np.asarray(out)


def decode_for_box(im: Image.Image, box_h: int, box_w: int, size: int) -> tuple[Image.Image, int]:
    """Decode ``im`` (from :func:`open_image`) at the DCT scale :func:`dct_scale` allows for a
    ``box_h`` x ``box_w`` box resampled to ``size`` -> (the decoded image, the scale ``s``:
    full-size coordinates times ``1 / s`` are decoded ones). Raises what Pillow raises for a
    corrupt or truncated file."""
    w, h = im.size
    s = dct_scale(box_h, box_w, size) if im.format == "JPEG" else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if s > 1:
            im.draft("RGB", (w // s, h // s))
        im.load()
    return im, s


def decode_crop(
    im: Image.Image, top: int, left: int, box_h: int, box_w: int, size: int
) -> np.ndarray:
    """Decode ``im`` (from :func:`open_image`) at the DCT scale chosen by :func:`dct_scale` and
    resample the box (``top``, ``left``, ``box_h``, ``box_w`` in full-size pixels) to uint8
    (size, size, 3). Raises what Pillow raises for a corrupt or truncated file."""
    im, s = decode_for_box(im, box_h, box_w, size)
    # the decoded size is ceil(w / s) x ceil(h / s); coordinates scale by exactly 1 / s
    f = 1.0 / s
    box = (left * f, top * f, (left + box_w) * f, (top + box_h) * f)
    return resize_box(im, box, size)
