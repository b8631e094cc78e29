"""The official learning-rate schedule (timm ``CosineLRScheduler``), evaluated per step.

timm steps its scheduler once per epoch; here ``t = step / steps_per_epoch`` is continuous, so the
warm-up and the cosine are smooth within an epoch (the values at whole epochs are timm's):

* ``t < warmup_epochs``: ``warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs``
* ``warmup_epochs <= t < epochs``: ``min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / epochs))``
  (timm's default ``warmup_prefix=False``: the cosine is not shifted by the warm-up)
* ``t >= epochs`` (the ``cooldown_epochs`` that follow): ``min_lr``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cosine_with_warmup(
    base_lr: float,
    steps_per_epoch: int,
    epochs: float,
    warmup_epochs: float,
    warmup_lr: float,
    min_lr: float,
) -> optax.Schedule:
    """step (int) -> learning rate (f32 scalar)."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) / steps_per_epoch
        warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1e-12)
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / epochs))
        lr = jnp.where(t < warmup_epochs, warm, cos)
        return jnp.where(t >= epochs, min_lr, lr)

    return schedule
