"""cga_jax side of the benchmark: jitted folded forward and jitted AdamW train step."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cga_jax
from bench.common import LR, WEIGHT_DECAY, inputs_nhwc, labels
from bench.fold import get_folder
from bench.worker_api import Task
from cga_jax.weights import load_timm_state_dict


def _load(spec: dict[str, Any]) -> nnx.Module:
    """The model with the shared weights. Built abstractly (``nnx.eval_shape``): eager random
    init would compile one small kernel per parameter shape - tens of seconds and extra RSS -
    for values that the checkpoint overwrites anyway (``load_timm_state_dict`` is strict)."""
    model = nnx.eval_shape(lambda: cga_jax.create_model(spec["variant"], rngs=nnx.Rngs(0)))
    with np.load(spec["weights"]) as f:
        load_timm_state_dict(model, {k: f[k] for k in f.files})
    return model


def build_infer(spec: dict[str, Any]) -> Task:
    """Eval forward, jitted with the parameters as arguments (not baked-in constants).

    Mode ``sharded``: the folded model data-parallel over every XLA device of the process (the
    batch sharded along a one-axis mesh, the weights replicated), as :func:`cga_jax.evaluate`
    runs.
    """
    model = _load(spec)
    model.eval()
    mode = spec.get("mode", "folded")
    info: dict[str, Any] = {"fold": "none", "devices": 1}
    if mode in ("folded", "sharded"):
        name, fold = get_folder(spec.get("fused_impl", "auto"))
        model = fold(model)
        info["fold"] = name
    graphdef, state = nnx.split(model)
    x = jnp.asarray(inputs_nhwc(spec["batch"]))
    out_sharding = None
    if mode == "sharded":
        devices = jax.devices()
        if spec["batch"] % len(devices):
            raise ValueError(f"batch {spec['batch']} does not split over {len(devices)} devices")
        mesh = Mesh(np.array(devices), ("data",))
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        x = jax.device_put(x, out_sharding := NamedSharding(mesh, PartitionSpec("data")))
        info["devices"] = len(devices)
    forward = jax.jit(
        lambda st, x: nnx.merge(graphdef, st)(x),
        out_shardings=out_sharding,
    )

    def step() -> jax.Array:
        return forward(state, x).block_until_ready()

    return Task(step=step, images_per_step=spec["batch"], info=info)


def build_train(spec: dict[str, Any]) -> Task:
    """One AdamW step on softmax cross-entropy, train-mode BN, parameters/state donated."""
    model = _load(spec)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    opt_state = tx.init(params)

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables at this trace level
        logits = m(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.split(m, nnx.Param, ...)[2]

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, rest, opt_state, x, y):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    x = jnp.asarray(inputs_nhwc(spec["batch"]))
    y = jnp.asarray(labels(spec["batch"]))
    carry = [params, rest, opt_state]

    def step() -> jax.Array:
        *new, loss = train_step(*carry, x, y)
        carry[:] = jax.block_until_ready(new)
        return loss

    return Task(step=step, images_per_step=spec["batch"], info={"optimizer": "optax.adamw"})


def build(spec: dict[str, Any]) -> Task:
    cga_jax.apply_cpu_flags()  # the README's call, before the first JAX computation
    return build_train(spec) if spec["task"] == "train" else build_infer(spec)
