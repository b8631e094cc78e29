"""ImageNet-style evaluation: top-1 / top-5 / cross-entropy over an image folder.

Decoding and the official eval transform (:mod:`cga_jax.preprocess`) run in a thread pool on the
host; the forward pass is jitted and data-parallel over ``jax.local_devices()`` (the batch is
sharded along a one-axis mesh, the weights replicated). The batch size is rounded up to a
multiple of the device count and the last batch is padded; padded slots are masked out, so every
image is counted exactly once. Unreadable (corrupt, truncated, empty) files are skipped: they
count in neither the accuracy nor the loss, and are reported (``skipped``, ``skipped_files``).
One process (all of its local devices); in a multi-host job each process would evaluate the whole
folder on its own devices.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cga_jax.classes import imagenet_synsets
from cga_jax.preprocess import list_image_folder, load_eval_image, normalize

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]


def folder_labels(classes: Sequence[str], num_classes: int) -> list[int]:
    """Label of each class folder: its sorted position, except that folders named by ImageNet
    synsets (``n01440764`` ...) for a 1000-class model take the synset's ImageNet-1k index (so a
    subset of the ImageNet validation classes is scored correctly)."""
    if num_classes == 1000:
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        if all(c in index for c in classes):
            return [index[c] for c in classes]
    if len(classes) > num_classes:
        raise ValueError(
            f"the folder has {len(classes)} class folders but the model has {num_classes} classes"
        )
    return list(range(len(classes)))


def _batches(
    samples: Sequence[tuple[str, int]],
    batch: int,
    load: Callable[[str], np.ndarray | None],
    shape: tuple[int, int, int],
    workers: int,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Fixed-size batches (uint8 (batch, *shape), int32 (batch,), bool valid (batch,), bad
    paths); the last batch is padded with valid=False. ``prefetch`` batches load ahead."""
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    submit = pool.submit if pool else _Done
    pending: collections.deque = collections.deque()
    starts = iter(range(0, len(samples), batch))
    try:
        for s in starts:
            pending.append((s, [submit(load, p) for p, _ in samples[s : s + batch]]))
            if len(pending) <= prefetch:
                continue
            yield _assemble(samples, *pending.popleft(), batch, shape)
        while pending:
            yield _assemble(samples, *pending.popleft(), batch, shape)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


class _Done:
    """A future that already ran (``workers=0``)."""

    def __init__(self, fn, *args):
        self._value = fn(*args)

    def result(self):
        return self._value


def _assemble(samples, start: int, futures: list, batch: int, shape) -> Batch:
    images = np.zeros((batch, *shape), np.uint8)
    labels = np.zeros((batch,), np.int32)
    valid = np.zeros((batch,), bool)
    bad = []
    for j, fut in enumerate(futures):
        path, label = samples[start + j]
        img = fut.result()
        if img is None:
            bad.append(path)
            continue
        images[j], labels[j], valid[j] = img, label, True
    return images, labels, valid, bad


def crop_size(model: nnx.Module, img_size: int | Sequence[int] | None = None) -> int:
    """``img_size`` or the model's ``cfg.img_size``, as one int (square crops only)."""
    size = img_size or model.cfg.img_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"img_size {tuple(size)}: only square crops are supported")
        size = size[0]
    return int(size)


def eval_split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of an eval-mode copy of ``model`` (``model`` itself is not modified)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return nnx.split(copy)


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _eval_step(graphdef: nnx.GraphDef, state, images, labels, valid, k: int):
    """uint8 (B, H, W, 3), int32 (B,), bool (B,) -> (int32 (2,) top-1 / top-k hits, f32 loss
    sum) over the valid rows. Module level with a static graphdef: compiled once per model
    structure and batch shape."""
    logits = nnx.merge(graphdef, state)(normalize(images)).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    hits = jax.lax.top_k(logits, k)[1] == labels[:, None]  # (B, k)
    counts = jnp.stack([hits[:, 0], hits.any(axis=1)]) & valid  # (2, B)
    return counts.sum(axis=1, dtype=jnp.int32), jnp.where(valid, nll, 0.0).sum()


def evaluate(
    model: nnx.Module,
    root: str | os.PathLike,
    *,
    batch_size: int = 256,
    img_size: int | None = None,
    crop_pct: float = 0.875,
    workers: int | None = None,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Evaluate ``model`` (used in eval mode; not modified) on ``root/<class>/<image>``.

    Args:
      batch_size: global batch, rounded up to a multiple of the number of devices.
      img_size: crop size (default: the model's ``cfg.img_size``); ``crop_pct``: the resize is
        ``floor(img_size / crop_pct)``.
      workers: decoding threads (default ``min(8, cpu_count)``; 0 decodes inline).
      devices: default ``jax.local_devices()``.

    Returns: ``{"top1", "top5"}`` (percent; top-5 is top-min(5, classes)), ``"loss"`` (mean
    cross-entropy), ``"images"`` (evaluated), ``"skipped"`` and ``"skipped_files"``
    (unreadable files), ``"files"`` (all files found), ``"classes"`` (class folders).
    """
    from tqdm import tqdm

    num_classes = model.num_classes
    samples, classes = list_image_folder(root)
    labels = folder_labels(classes, num_classes)
    samples = [(p, labels[c]) for p, c in samples]
    img_size = crop_size(model, img_size)
    devices = list(devices or jax.local_devices())
    batch = math.ceil(batch_size / len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    data = NamedSharding(mesh, PartitionSpec("data"))
    graphdef, state = eval_split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    k = min(5, num_classes)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers

    def load(path: str) -> np.ndarray | None:
        return load_eval_image(path, img_size, crop_pct)

    results, bad = [], []
    bar = tqdm(total=len(samples), unit="img", disable=not progress, file=sys.stderr)
    for images, lab, valid, b in _batches(samples, batch, load, (img_size, img_size, 3), workers):
        args = jax.device_put((images, lab, valid), data)
        results.append(_eval_step(graphdef, state, *args, k=k))
        bad += b
        bar.update(int(valid.sum()) + len(b))
    bar.close()
    hits = sum((np.asarray(r[0], np.int64) for r in results), np.zeros(2, np.int64))
    loss = sum(float(r[1]) for r in results)
    n = len(samples) - len(bad)
    return {
        "top1": 100.0 * float(hits[0]) / max(n, 1),
        "top5": 100.0 * float(hits[1]) / max(n, 1),
        "loss": loss / max(n, 1),
        "images": n,
        "skipped": len(bad),
        "skipped_files": bad,
        "files": len(samples),
        "classes": len(classes),
    }
