"""The learning-rate schedule of the official recipe (timm ``CosineLRScheduler``), per update.

With ``t = step / steps_per_epoch`` (continuous) the update at ``step`` uses ``f(t)``:

* ``t < warmup_epochs``: ``warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs``
* ``warmup_epochs <= t < epochs``: ``min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / epochs))``
  (timm's default ``warmup_prefix=False``: the cosine is not shifted by the warm-up)
* ``t >= epochs`` (the ``cooldown_epochs`` that follow): ``min_lr``.

How this relates to stepping ``f`` once per epoch (``S`` updates per epoch, ``E = step // S``):

* timm's per-update mode (``--sched-on-updates``, ``step_update`` after every update) uses
  ``f(step / S)`` too: the same values.
* timm's ``train.py`` per-epoch mode (``step(epoch + 1)`` after each epoch) uses ``f(E)`` for the
  whole epoch: this schedule is ahead of it by ``step / S - E``, less than one epoch.
* The official EfficientViT loop (Cream ``main.py``, from DeiT) calls ``step(epoch)`` after
  epoch ``epoch``, so epoch ``E`` runs at ``f(max(E - 1, 0))``: epochs 0 and 1 at ``f(0)``, and
  from epoch 1 on this schedule is ahead by ``step / S - (E - 1)``, one to two epochs. The value
  the official loop holds during epoch ``E >= 1`` is the one used here at the first update of
  epoch ``E - 1`` (``tests/test_train_recipe.py`` checks this against timm's scheduler).
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
    """step (int) -> learning rate (float32 scalar), ``f(step / steps_per_epoch)`` above."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) / steps_per_epoch
        warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1e-12)
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / epochs))
        lr = jnp.where(t < warmup_epochs, warm, cos)
        return jnp.where(t >= epochs, min_lr, lr)

    return schedule


def lr_for_batch(lr: float, global_batch: int) -> float:
    """The official linear scaling: ``lr * global_batch / 512``."""
    return lr * global_batch / 512


def make_schedule(optim, *, batch_size: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule of an ``optim`` config (``cfg.optim``) for a global ``batch_size``."""
    return cosine_with_warmup(
        base_lr=lr_for_batch(optim.lr, batch_size),
        steps_per_epoch=steps_per_epoch,
        epochs=optim.epochs,
        warmup_epochs=optim.warmup_epochs,
        warmup_lr=optim.warmup_lr,
        min_lr=optim.min_lr,
    )
