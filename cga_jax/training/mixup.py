"""Targets and losses: label smoothing, per-batch mixup / cutmix (timm ``Mixup``, mode 'batch').

Runs inside the jitted step on the global batch (timm mixes each GPU's local batch); the partner
of sample ``i`` is sample ``B - 1 - i`` (the flipped batch), as in timm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """(B,) int -> (B, num_classes): ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def cutmix_box(key: jax.Array, lam: jax.Array, h: int, w: int):
    """timm ``rand_bbox``: a box with sides ``sqrt(1 - lam)`` of the image, uniform centre,
    clipped to the image. Returns (y0, y1, x0, x1) int32 scalars."""
    ratio = jnp.sqrt(1.0 - lam)
    ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, h)
    cx = jax.random.randint(kx, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    return y0, y1, x0, x1


def mix_batch(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    prob: float = 1.0,
):
    """images (B, H, W, C), soft targets (B, K) -> mixed images and targets.

    One ``lam`` per batch: with ``prob``, mix; cutmix with ``switch_prob`` when both alphas are set
    (otherwise whichever is set). Cutmix corrects ``lam`` to the pasted area (``correct_lam``).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_do, k_sw, k_mu, k_cm, k_box = jax.random.split(key, 5)
    b, h, w, _ = images.shape
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_sw) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mu = jax.random.beta(k_mu, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cm = jax.random.beta(k_cm, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
    lam = jnp.where(use_cutmix, lam_cm, lam_mu)
    y0, y1, x0, x1 = cutmix_box(k_box, lam, h, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (H, W)
    lam_cm_corrected = 1.0 - jnp.sum(inside) / (h * w)
    lam = jnp.where(use_cutmix, lam_cm_corrected, lam)
    do = jax.random.uniform(k_do) < prob
    lam = jnp.where(do, lam, 1.0).astype(jnp.float32)
    flipped = images[::-1]
    mixed_mu = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    mixed_cm = jnp.where(inside[None, :, :, None], flipped, images)
    mixed = jnp.where(use_cutmix, mixed_cm, mixed_mu)
    mixed = jnp.where(do, mixed, images)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, K), (B, K) -> (B,): ``-sum(targets * log_softmax(logits))`` in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
