"""Classify image files: top-k classes with softmax probabilities."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.evaluate import crop_size, eval_split
from cga_jax.preprocess import load_eval_image, normalize

Prediction = list[tuple[int, float]]  # [(class index, probability)], most likely first


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _probs_topk(graphdef: nnx.GraphDef, state, images, k: int):
    """uint8 (B, S, S, 3) -> (f32 (B, k) probabilities, int32 (B, k) indices)."""
    logits = nnx.merge(graphdef, state)(normalize(images)).astype(jnp.float32)
    return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)


def predict(
    model: nnx.Module,
    paths: Sequence[str | os.PathLike],
    *,
    topk: int = 5,
    img_size: int | None = None,
    crop_pct: float = 0.875,
    batch_size: int = 32,
) -> list[Prediction | None]:
    """Top-``topk`` (index, probability) per file, None for a file that cannot be decoded.

    Each image gets the official eval transform (:func:`cga_jax.preprocess.eval_preprocess`);
    ``model`` runs in eval mode (a copy; the argument is not modified).
    """
    graphdef, state = eval_split(model)
    k = min(topk, model.num_classes)
    img_size = crop_size(model, img_size)

    images = [load_eval_image(p, img_size, crop_pct) for p in paths]
    ok = [i for i, im in enumerate(images) if im is not None]
    out: list[Prediction | None] = [None] * len(paths)
    size = max(1, min(batch_size, len(ok)))
    for s in range(0, len(ok), size):
        idx = ok[s : s + size]
        batch = np.zeros((size, img_size, img_size, 3), np.uint8)  # one compiled shape
        batch[: len(idx)] = np.stack([images[i] for i in idx])
        p, c = (np.asarray(a) for a in _probs_topk(graphdef, state, batch, k=k))
        for row, i in enumerate(idx):
            out[i] = [(int(c[row, j]), float(p[row, j])) for j in range(k)]
    return out
