"""Run by test_train_distributed.py: three training steps of the tiny model on a 2-device mesh.

``python tests/distributed_step.py ROOT OUT dist PID PORT``: one of two ``jax.distributed``
processes on localhost (one CPU device each, gloo collectives); each process feeds only its half of
every global batch (``jax.make_array_from_process_local_data``), as the trainer does.
``python tests/distributed_step.py ROOT OUT local``: one process with 2 simulated devices, fed
the whole batch. Each process writes ``OUT/<mode>-<pid>.npz``: the per-step losses and gradient
norms and the final parameters and BN statistics.
"""

from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, sys.argv[1])
out_dir, mode = sys.argv[2], sys.argv[3]

import jax  # noqa: E402

if mode == "dist":
    jax.distributed.initialize(
        coordinator_address=f"localhost:{sys.argv[5]}", num_processes=2, process_id=int(sys.argv[4])
    )

from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cga_jax.training import data as data_lib  # noqa: E402
from cga_jax.training.trainer import setup  # noqa: E402
from tests.train_helpers import tiny_digits_config  # noqa: E402


def main() -> None:
    assert jax.device_count() == 2, jax.devices()
    pid, nproc = jax.process_index(), jax.process_count()
    cfg = tiny_digits_config(**{"aug.mixup": 0.8, "aug.cutmix": 1.0, "optim.lr": 0.08})
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    dsh = NamedSharding(mesh, P("data"))
    program, state = setup(cfg, num_classes=10, steps_per_epoch=40, mesh=mesh)
    f = program.train_step  # jitted, the state donated and replicated

    src = data_lib.DigitsSource("train", size=32)
    local = cfg.batch_size // nproc
    losses, norms = [], []
    for s in range(3):
        rows = np.arange(cfg.batch_size) + cfg.batch_size * s
        rows = rows[pid * local : (pid + 1) * local]  # this process's part of the global batch
        batch = {
            "image": src.images[rows],
            "label": src.labels[rows],
            "valid": np.ones(len(rows), np.int32),
        }
        glob = {k: jax.make_array_from_process_local_data(dsh, v) for k, v in batch.items()}
        state, m = f(state, glob)
        losses.append(np.asarray(m["train_loss"].addressable_data(0)))
        norms.append(np.asarray(m["grad_norm"].addressable_data(0)))

    def host(tree):  # replicated global arrays -> numpy, via this process's own shard
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}

    np.savez(
        f"{out_dir}/{mode}-{pid}.npz",
        loss=np.array(losses),
        grad_norm=np.array(norms),
        **{"p" + k: v for k, v in host(state["params"]).items()},
        **{"s" + k: v for k, v in host(state["batch_stats"]).items()},
    )
    print(f"process {pid}/{nproc}: losses {[float(x) for x in losses]}")


if __name__ == "__main__":
    main()
