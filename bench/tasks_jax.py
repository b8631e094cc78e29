"""cga_jax side of the benchmark: the README's inference path, and a jitted AdamW train step.

Inference is exactly the README quickstart::

    cga_jax.apply_cpu_flags()                   # setup(), before the first JAX computation
    model = cga_jax.create_model(variant, pretrained=weights)
    model.eval()
    model = cga_jax.fuse_bn(model)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

with nothing else: no compiler options, no private helpers. ``dtype='bfloat16'`` casts the
float32 input to bfloat16 inside that jitted function (the float32 parameters are cast where the
layers use them, as PyTorch's autocast does); mode ``sharded`` places the state replicated and
the batch split over the process's devices before calling the same ``forward``.
"""

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
from bench.worker_api import Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def setup(proc: dict[str, Any]) -> dict[str, Any]:
    """The README's first call, then what the process runs on."""
    cga_jax.apply_cpu_flags()  # before the first JAX computation; GPU/TPU compilers ignore them
    dev = jax.devices()[0]
    client = getattr(dev, "client", None)
    return {
        "jax_backend": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "platform_version": " ".join(str(getattr(client, "platform_version", "?")).split()),
    }


def _load(spec: dict[str, Any]) -> nnx.Module:
    """The README's model: ``create_model`` with the shared weights (a timm-layout ``.npz``)."""
    return cga_jax.create_model(spec["variant"], pretrained=spec["weights"])


def build_infer(spec: dict[str, Any]) -> Task:
    """Eval forward, jitted with the parameters as arguments (not baked-in constants).

    Modes: ``folded`` (the README path), ``sharded`` (the folded model data-parallel over every
    XLA device of the process: batch split along a one-axis mesh, weights replicated, as
    :func:`cga_jax.evaluate` runs), ``unfolded`` (no ``fuse_bn``).
    """
    model = _load(spec)
    model.eval()
    mode = spec.get("mode", "folded")
    info: dict[str, Any] = {"fold": "none", "devices": 1, "dtype": spec.get("dtype", "float32")}
    if mode in ("folded", "sharded"):
        model = cga_jax.fuse_bn(model)
        info["fold"] = "cga_jax.fuse_bn"
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    dtype = DTYPES[info["dtype"]]
    if dtype != jnp.float32:
        readme_forward = forward
        forward = jax.jit(lambda state, x: readme_forward(state, x.astype(dtype)))
    x = jnp.asarray(inputs_nhwc(spec["batch"]))
    if mode == "sharded":
        devices = jax.devices()
        if spec["batch"] % len(devices):
            raise ValueError(f"batch {spec['batch']} does not split over {len(devices)} devices")
        mesh = Mesh(np.array(devices), ("data",))
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        info["devices"] = len(devices)

    def step() -> jax.Array:
        return forward(state, x).block_until_ready()

    return Task(step=step, images_per_step=spec["batch"], info=info)


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def build_train(spec: dict[str, Any]) -> Task:
    """One AdamW step on softmax cross-entropy, train-mode BN, parameters/state donated.

    ``dtype='bfloat16'``: as cga_jax's trainer (``compute_dtype``): float32 parameters and
    optimizer state, cast to bfloat16 inside the step with the input; BN statistics and the loss
    in float32.
    """
    model = _load(spec)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    opt_state = tx.init(params)
    dtype = DTYPES[spec.get("dtype", "float32")]

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, _cast(params, dtype), rest, copy=True)
        logits = m(x.astype(dtype)).astype(jnp.float32)
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

    info = {"optimizer": "optax.adamw", "dtype": spec.get("dtype", "float32")}
    return Task(step=step, images_per_step=spec["batch"], info=info)


def build(spec: dict[str, Any]) -> Task:
    return build_train(spec) if spec["task"] == "train" else build_infer(spec)


def is_oom(exc: BaseException) -> bool:
    """XLA's out-of-memory error (``RESOURCE_EXHAUSTED``), from the allocator or the compiler."""
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def release() -> None:
    """Nothing to do: XLA frees a buffer once no Python object holds it (the caller collects)."""


def reset_peak_memory() -> None:
    """XLA keeps one peak per process: :func:`device_memory` reports that."""


def device_memory() -> dict[str, Any]:
    """The device's bytes in use and the process's peak so far (accelerators only)."""
    stats = jax.devices()[0].memory_stats() or {}
    out = {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        if key in stats:
            out[f"device_{key}_mib"] = stats[key] / 2**20
    return out
