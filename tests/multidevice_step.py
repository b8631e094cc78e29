"""Run by test_train_multidevice.py with 8 simulated CPU devices: two training steps on one mesh of
8 devices and on a mesh of 1 device, same global batch; prints the max differences."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, sys.argv[1])
from cga_jax.training import data as data_lib  # noqa: E402
from cga_jax.training.steps import make_train_step  # noqa: E402
from cga_jax.training.trainer import initial_state, setup  # noqa: E402
from tests.train_helpers import tiny_digits_config  # noqa: E402


def run(devices, cfg, batches):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(AxisType.Auto,))
    repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    program, state = setup(cfg, num_classes=10, steps_per_epoch=40, mesh=mesh)
    # Plain SGD so that the parameter change is lr * gradient: Adam's first update is
    # ~lr * sign(g), which turns reduction noise on gradients that are 0 in exact arithmetic into
    # +-lr and hides what this test checks (the step's loss, gradients and BN statistics).
    tx = optax.sgd(1.0)
    state = initial_state(state["params"], state["batch_stats"], tx, cfg.seed)
    step = make_train_step(
        cfg,
        graphdef=program.graphdef,
        rest=program.rest,
        tx=tx,
        schedule=program.schedule,
        num_classes=10,
    )
    state = jax.device_put(state, repl)
    f = jax.jit(step, out_shardings=(jax.tree.map(lambda _: repl, state), repl))
    for b in batches:
        state, m = f(state, {k: jax.device_put(v, dsh) for k, v in b.items()})
    return jax.device_get(state), {k: float(v) for k, v in jax.device_get(m).items()}


def main():
    cfg = tiny_digits_config(
        **{"aug.mixup": 0.8, "aug.cutmix": 1.0, "optim.lr": 0.08, "optim.warmup_epochs": 0.0}
    )
    cfg.batch_size = 32
    src = data_lib.DigitsSource("train", size=32)
    batches = []
    for s in range(3):
        idx = np.arange(32) + 32 * s
        batches.append(
            {
                "image": src.images[idx],
                "label": src.labels[idx],
                "valid": np.ones(32, np.int32),
            }
        )
    s8, m8 = run(jax.devices()[:8], cfg, batches[:1])
    s1, m1 = run(jax.devices()[:1], cfg, batches[:1])
    mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(AxisType.Auto,))
    p0 = jax.device_get(setup(cfg, num_classes=10, steps_per_epoch=40, mesh=mesh1)[1]["params"])

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3))

    stats = max(
        rel(a, b)
        for a, b in zip(
            jax.tree.leaves(s8["batch_stats"]), jax.tree.leaves(s1["batch_stats"]), strict=True
        )
    )
    d = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(
                jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"]), strict=True
            )
        ]
    )
    moved = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(p0), strict=True)
        ]
    )
    print(
        json.dumps(
            {
                "n": jax.device_count(),
                "m8": m8,
                "m1": m1,
                "bn_stats_rel": stats,
                "param_max_abs": float(d.max()),
                "grad_rel": float(d.max() / moved.max()),
                "moved_max": float(moved.max()),
            }
        )
    )


if __name__ == "__main__":
    main()
