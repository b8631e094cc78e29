"""The two computations of a run, as pure functions for ``jax.jit``: the train and the eval step.

The model graph is split once (:func:`cga_jax.training.trainer.setup`) and merged inside the step
from the state's arrays, so a step is a function of arrays only. Images arrive as uint8 and are
normalised on the device (:func:`cga_jax.preprocess.normalize`, the one ``cga-jax eval`` uses).
Step randomness (random-erasing noise, mixup/cutmix) is ``fold_in(state["rng"], state["step"])``:
a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cga_jax.preprocess import normalize
from cga_jax.training.device_augment import augment as device_augment
from cga_jax.training.device_resize import resize_crops
from cga_jax.training.distill import distillation_loss
from cga_jax.training.erasing import apply_erase
from cga_jax.training.mixup import mix_batch, smooth_one_hot
from cga_jax.training.optim import ema_update

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (integer leaves kept)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def make_train_step(
    cfg,
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_classes: int,
    teacher_graphdef: nnx.GraphDef | None = None,
) -> Callable:
    """-> ``train_step(state, batch, teacher=None) -> (state, metrics)``.

    ``state``: ``{"params", "batch_stats", "opt_state", "ema", "step", "rng"}``; ``batch``:
    ``image`` uint8 (B, H, W, 3), ``label`` int (B,), ``valid`` int (B,) (0: an unreadable
    image, left out of the loss), optionally ``erase`` int32 (B, 4) boxes and ``flip`` / ``ra``
    (``data.device_aug``: :func:`~cga_jax.training.device_augment.augment` applies them before
    normalising) and ``crop`` float32 (B, 7) (``data.device_resize``: ``image`` is then a uint8
    canvas (B, Hc, Wc, 3) that :func:`~cga_jax.training.device_resize.resize_crops` turns into
    (B, img_size, img_size, 3) first); ``teacher``: the
    teacher's ``(params, rest)`` for ``teacher_graphdef``, or None. ``metrics``: ``train_loss``,
    ``lr``, ``grad_norm``, ``bad_images``. Reads ``cfg.compute_dtype``, ``cfg.img_size``, ``cfg.aug``,
    ``cfg.distill`` and ``cfg.ema_decay``.
    """
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    smoothing, ema_decay = cfg.aug.label_smoothing, cfg.ema_decay
    mixup, cutmix = cfg.aug.mixup, cfg.aug.cutmix
    switch_prob, mix_prob = cfg.aug.mixup_switch_prob, cfg.aug.mixup_prob
    kind, alpha, tau = cfg.distill.kind, cfg.distill.alpha, cfg.distill.tau

    def train_step(state, batch, teacher=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        images = batch["image"]
        if "crop" in batch:  # data.device_resize: the crop boxes are resampled here
            images = resize_crops(images, batch["crop"], cfg.img_size)
        if "flip" in batch or "ra" in batch:  # data.device_aug: flip + RandAugment here
            images = device_augment(dict(batch, image=images))
        x = normalize(images)
        if "erase" in batch:  # random erasing, after normalisation (boxes drawn by the loader)
            x = apply_erase(jax.random.fold_in(key, 1), x, batch["erase"])
        valid = batch["valid"].astype(jnp.float32)
        targets = smooth_one_hot(batch["label"], num_classes, smoothing)
        x, targets = mix_batch(key, x, targets, mixup, cutmix, switch_prob, mix_prob)
        t_logits = None
        if teacher is not None:  # eval mode, no gradient, the same (mixed) images as DeiT
            tm = nnx.merge(teacher_graphdef, cast_floats(teacher[0], dtype), teacher[1], copy=True)
            t_logits = jax.lax.stop_gradient(tm(x.astype(dtype)))

        def loss_fn(params):
            m = nnx.merge(
                graphdef, cast_floats(params, dtype), state["batch_stats"], rest, copy=True
            )
            out = m(x.astype(dtype))
            logits, logits_dist = out if isinstance(out, tuple) else (out, None)
            loss = distillation_loss(
                logits, logits_dist, t_logits, targets, valid, kind, alpha, tau
            )
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = ema_update(ema_decay, {"params": params, "batch_stats": new_stats}, state["ema"])
        metrics = {
            "train_loss": loss,
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
            "bad_images": jnp.sum(1.0 - valid),
        }
        new_state = dict(
            state,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            ema=ema,
            step=state["step"] + 1,
        )
        return new_state, metrics

    return train_step


def make_eval_step(cfg, *, graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
    """-> ``eval_step(params, batch_stats, batch) -> (correct, count)``: the number of
    correctly classified valid images of the batch and the number of valid images (``graphdef``:
    the model in eval mode)."""
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]

    def eval_step(params, batch_stats, batch):
        m = nnx.merge(graphdef, cast_floats(params, dtype), batch_stats, rest, copy=True)
        logits = m(normalize(batch["image"]).astype(dtype))
        valid = batch["valid"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * valid
        return jnp.sum(correct), jnp.sum(valid)

    return eval_step
