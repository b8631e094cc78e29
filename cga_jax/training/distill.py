"""Knowledge distillation, DeiT's ``DistillationLoss``, and the teacher.

``distill.kind``: "none" (no teacher; a distillation head, if the model has one, trains on the
same targets as the class head), "soft" or "hard". With a teacher, as DeiT::

    base = criterion(class_head, targets)                   # soft targets: smoothing / mixup
    soft: KL(log_softmax(dist_head / T) || log_softmax(teacher / T)), summed over the batch and
          the classes, * T^2 / (B * K)                      # DeiT divides by outputs_kd.numel()
    hard: cross_entropy(dist_head, argmax(teacher))
    loss = base * (1 - alpha) + distill * alpha

The teacher sees the same (mixed, erased) images as the student, in eval mode, without gradient.
Records with ``valid=0`` (unreadable files) are left out of every mean.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cga_jax.training.mixup import soft_cross_entropy
from cga_jax.training.models import build_model

KINDS = ("none", "soft", "hard")


def _masked_mean(v: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(v * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def distillation_loss(
    logits: jax.Array,
    logits_dist: jax.Array | None,
    teacher_logits: jax.Array | None,
    targets: jax.Array,
    valid: jax.Array,
    kind: str = "none",
    alpha: float = 0.5,
    tau: float = 1.0,
) -> jax.Array:
    """Scalar loss. logits, logits_dist, teacher_logits (B, K); targets (B, K) soft; valid (B,)."""
    base = _masked_mean(soft_cross_entropy(logits, targets), valid)
    if kind == "none":
        if logits_dist is None:
            return base
        return 0.5 * (base + _masked_mean(soft_cross_entropy(logits_dist, targets), valid))
    if kind not in KINDS:
        raise ValueError(f"distill.kind must be one of {KINDS}, got {kind!r}")
    if logits_dist is None or teacher_logits is None:
        raise ValueError("distillation needs the model's distillation head and a teacher")
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    d = logits_dist.astype(jnp.float32)
    if kind == "soft":
        log_p_t = jax.nn.log_softmax(t / tau, axis=-1)
        log_p_s = jax.nn.log_softmax(d / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)  # (B,)
        dist = _masked_mean(kl, valid) * (tau * tau) / d.shape[-1]
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(d, jnp.argmax(t, axis=-1))
        dist = _masked_mean(ce, valid)
    return base * (1.0 - alpha) + dist * alpha


class Teacher(NamedTuple):
    graphdef: nnx.GraphDef  # the teacher in eval mode
    state: tuple  # (params, rest): a replicated, non-donated argument of the train step


def build_teacher(cfg, *, num_classes: int) -> Teacher | None:
    """The eval-mode teacher of ``cfg.distill``, or None when ``distill.kind`` is "none".

    ``distill.teacher`` is a model spec like ``cfg.model``, built by the same builder
    (:func:`~cga_jax.training.models.build_model`) with the student's ``num_classes``; its
    ``pretrained`` weights load strictly. No weights is allowed (tests) but warns: a random
    teacher only adds noise."""
    dc = cfg.distill
    if dc.kind == "none":
        return None
    if not dc.teacher.pretrained:
        warnings.warn("distill.teacher.pretrained is empty: the teacher is random", stacklevel=2)
    teacher = build_model(
        dc.teacher,
        img_size=cfg.img_size,
        num_classes=num_classes,
        distillation=dc.teacher.distillation,
        seed=cfg.seed + 1,
        new_head=False,
    )
    teacher.eval()
    graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
    return Teacher(graphdef, (params, rest))
