"""ImageNet evaluation preprocessing without Grain or torch.

:func:`eval_preprocess` is the official (timm / torchvision) evaluation transform on a decoded
image: ``Resize(floor(img_size / crop_pct))`` (shorter side, bicubic, the longer side truncated
with ``int()`` like torchvision) then ``CenterCrop(img_size)`` (offsets rounded like torchvision,
zero padding when the image is smaller than the crop). Pixels stay uint8 (H, W, 3); normalising
(:func:`normalize`) happens on the device.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(path: str | os.PathLike) -> np.ndarray | None:
    """File -> uint8 (H, W, 3) RGB, or None when it cannot be decoded in full (corrupt or
    truncated). Grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception:  # noqa: BLE001 - any decode failure means "skip and count"
        return None


def resize_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (new_h, new_w): shorter side ``size``, longer side
    ``int(size * long / short)``."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` on (H, W, C): zero-pad to at least ``size`` (extra pixel
    on the bottom/right), then crop at ``round((H - size) / 2)``, ``round((W - size) / 2)``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        img = np.pad(img, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top : top + size, left : left + size]


def eval_preprocess(img: np.ndarray, img_size: int = 224, crop_pct: float = 0.875) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (img_size, img_size, 3): bicubic resize of the shorter side to
    ``floor(img_size / crop_pct)``, centre crop."""
    scale = math.floor(img_size / crop_pct)
    h, w = img.shape[:2]
    nh, nw = resize_shape(h, w, scale)
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    return np.ascontiguousarray(center_crop(img, img_size))


def load_eval_image(
    path: str | os.PathLike, img_size: int = 224, crop_pct: float = 0.875
) -> np.ndarray | None:
    """Decode + :func:`eval_preprocess`; None for an unreadable file."""
    img = decode_image(path)
    return None if img is None else eval_preprocess(img, img_size, crop_pct)


def normalize(images):
    """uint8 (B, H, W, 3) -> float32 ``(x / 255 - mean) / std`` (torchvision's ToTensor +
    Normalize, channels last). Works on numpy and jax arrays."""
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def list_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageNet-style ``root/<class>/**/<image>`` -> ([(path, class index)], class names).

    Class index = position of the folder name in sorted order (torchvision ``ImageFolder``);
    files are taken by extension (``IMAGE_EXTS``, case-insensitive), sorted per class.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (expected root/<class>/<image>)")
    samples = [
        (str(f), c)
        for c, name in enumerate(classes)
        for f in sorted((root / name).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_EXTS
    ]
    if not samples:
        raise FileNotFoundError(
            f"{root}: no images in its {len(classes)} class folders (extensions: "
            f"{', '.join(IMAGE_EXTS)})"
        )
    return samples, classes
