"""Optimiser of the official recipe: AGC (unit-wise, timm definition) -> AdamW with a decay mask.

Weight decay follows timm's ``param_groups_weight_decay``: every parameter with more than one
dimension decays, except biases and the leaves the model's ``no_weight_decay()`` names (for
EfficientViT, ``attention_biases``); BN scales and biases are vectors and do not decay.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax


def leaf_name(path) -> str:
    """The parameter name of a pytree path into an ``nnx.State`` (``.../kernel/value`` -> kernel)."""
    names = [getattr(k, "key", None) for k in path]
    names = [str(n) for n in names if n is not None]
    return names[-1] if names else ""


def decay_mask(params, no_weight_decay: Iterable[str]):
    """Pytree of bools (same structure as ``params``): True where weight decay applies.
    ``no_weight_decay``: leaf names kept out (the model's ``no_weight_decay()``)."""
    skip = frozenset(no_weight_decay)

    def f(path, x):
        name = leaf_name(path)
        return bool(x.ndim > 1 and name != "bias" and name not in skip)

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


def make_optimizer(
    optim, *, params, schedule: optax.Schedule, no_weight_decay: Iterable[str]
) -> optax.GradientTransformation:
    """AGC (``optim.clip_grad``; 0 for none) then AdamW with the learning rate ``schedule`` and
    :func:`decay_mask` of ``params`` (``optim``: ``cfg.optim``)."""
    parts = []
    if optim.clip_grad:
        parts.append(adaptive_grad_clip(optim.clip_grad))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.betas[0],
            b2=optim.betas[1],
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask(params, no_weight_decay),
        )
    )
    return optax.chain(*parts)


def ema_init(tree) -> optax.EmaState:
    """EMA state started from a copy of the model (timm ``ModelEmaV2``), not from zeros."""
    state = optax.ema(0.0, debias=False).init(tree)
    return state._replace(ema=jax.tree.map(lambda x: x.copy(), tree))


def ema_update(decay: float, tree, state: optax.EmaState) -> optax.EmaState:
    """``ema = decay * ema + (1 - decay) * tree`` over parameters and BN statistics."""
    return optax.ema(decay, debias=False).update(tree, state)[1]
