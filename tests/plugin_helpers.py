"""Helpers for the plug-in / feature tests (no torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
