"""Optimiser of the official recipe: AGC (unit-wise, timm definition) -> AdamW with a decay mask.

Weight decay is applied, as in timm's ``param_groups_weight_decay`` with the model's
``no_weight_decay()`` names, to every parameter with more than one dimension except the attention
biases: no decay on biases, BN scales/biases and ``attention_biases``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cga_jax.training.schedule import cosine_with_warmup


def leaf_name(path) -> str:
    """The parameter name of a pytree path into an ``nnx.State`` (``.../kernel/value`` -> kernel)."""
    names = [getattr(k, "key", None) for k in path]
    names = [str(n) for n in names if n is not None]
    return names[-1] if names else ""


def path_str(path) -> str:
    names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return ".".join(str(n) for n in names if n is not None)


def decay_mask(params, no_decay: tuple[str, ...] = ("attention_biases",)):
    """Pytree of bools (same structure as ``params``): True where weight decay applies."""

    def f(path, x):
        name = leaf_name(path)
        return bool(x.ndim > 1 and name != "bias" and name not in no_decay)

    return jax.tree_util.tree_map_with_path(f, params)


def _unit_axes(name: str, ndim: int) -> tuple[int, ...] | None:
    """Axes summed by timm's unit-wise norm, in this project's layouts (None: whole tensor).

    timm (torch layouts) norms over every axis but the first (the output unit); here kernels are
    HWIO / (in, out) with the output last, and ``attention_biases`` are (heads, points) with the
    head first, as in torch.
    """
    if ndim <= 1:
        return None
    if name == "attention_biases":
        return tuple(range(1, ndim))
    return tuple(range(ndim - 1))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """timm's ``--clip-mode agc`` (``timm.utils.agc``): per output unit,
    ``g <- g * max(|p|, eps) * clipping / max(|g|, 1e-6)`` where ``|g| > max(|p|, eps) * clipping``.

    ``optax.adaptive_grad_clip`` is the same rule but takes the unit axis from the shape (last axis,
    after squeezing): wrong for ``attention_biases`` (heads first) and for (heads, 1) tables, so
    the rule is written here with the axis named per parameter.
    """

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params")

        def clip(path, g, p):
            axes = _unit_axes(leaf_name(path), g.ndim)
            pn = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=axes is not None))
            gn = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=axes is not None))
            max_norm = jnp.maximum(pn, eps) * clipping
            clipped = g * (max_norm / jnp.maximum(gn, 1e-6))
            return jnp.where(gn < max_norm, g, clipped).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    o = cfg.optim
    return cosine_with_warmup(
        base_lr=lr_for_batch(o.lr, cfg.batch_size),
        steps_per_epoch=steps_per_epoch,
        epochs=o.epochs,
        warmup_epochs=o.warmup_epochs,
        warmup_lr=o.warmup_lr,
        min_lr=o.min_lr,
    )


def lr_for_batch(lr: float, global_batch: int) -> float:
    """The official linear scaling: ``lr * global_batch / 512``."""
    return lr * global_batch / 512


def make_optimizer(cfg, params, schedule: Callable) -> optax.GradientTransformation:
    o = cfg.optim
    parts = []
    if o.clip_grad:
        parts.append(adaptive_grad_clip(o.clip_grad))
    parts.append(
        optax.adamw(
            schedule,
            b1=o.betas[0],
            b2=o.betas[1],
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask(params),
        )
    )
    return optax.chain(*parts)


def ema_init(tree) -> optax.EmaState:
    """EMA state started from a copy of the model (timm ``ModelEmaV2``), not from zeros."""
    state = optax.ema(0.0, debias=False).init(tree)
    return state._replace(ema=jax.tree.map(lambda x: x.copy(), tree))


def ema_update(decay: float, tree, state: optax.EmaState):
    """``ema = decay * ema + (1 - decay) * tree`` over parameters and BN statistics."""
    new, state = optax.ema(decay, debias=False).update(tree, state)
    return new, state
