"""Helpers for the plug-in / feature tests (no torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.layers import BatchNorm


def randomize_nnx(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """Set every Param and BatchStat to random, well-scaled values (in place).

    Default inits hide bugs (several BN scales start at 0, making branches vanish). Works on an
    abstract module from ``nnx.eval_shape`` too, which makes building test models fast.
    """
    rng = np.random.RandomState(seed)
    state = nnx.state(module, (nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    leaves = []
    for path, v in flat:
        name = str(path[-1])
        shape = tuple(np.shape(v))
        if "var" in name or "scale" in name:
            val = rng.uniform(0.5, 1.5, shape)
        elif "kernel" in name:
            val = rng.randn(*shape) * float(np.prod(shape[:-1])) ** -0.5
        elif "attention_biases" in name:
            val = rng.randn(*shape) * 0.5
        else:
            val = rng.randn(*shape) * 0.1
        leaves.append(jnp.asarray(val, jnp.float32))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    nnx.update(module, state)
    return module


def calibrate_bn(module: nnx.Module, x: jax.Array) -> nnx.Module:
    """Set every BatchNorm's running statistics to the batch statistics of one train-mode pass
    on ``x`` (in place; the module is left in eval mode).

    Random running statistics (``randomize_nnx``) compound over a deep network: eval-mode logits
    of M0 reach ~3e4, where any two float32 summation orders differ in the leading digits.
    """
    norms = [m for _, m in nnx.iter_modules(module) if isinstance(m, BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running := batch
    module.train()
    nnx.jit(lambda mod, v: mod(v))(module, x)
    for m, s in zip(norms, saved, strict=True):
        m.momentum = s
    module.eval()
    return module
