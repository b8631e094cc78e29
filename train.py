"""Train EfficientViT: ``python train.py --config configs/efficientvit.py:m0 --workdir DIR``.

Any config field can be overridden, e.g. ``--config.optim.lr=2e-3 --config.batch_size=1024``.
Several processes (multi-host TPU/GPU): ``jax.distributed.initialize()`` is called when
``--multiprocess`` is given or the usual cluster environment is detected.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path.py:variant)")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and curves go here")
_MULTI = flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize()")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --multiprocess)")
_NPROC = flags.DEFINE_integer("num_processes", None, "process count (with --coordinator)")
_PID = flags.DEFINE_integer("process_id", None, "this process's id (with --coordinator)")


def main(argv) -> None:
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    import cga_jax

    cga_jax.apply_cpu_flags(strict=False)  # XLA-CPU flags (ignored on GPU/TPU), before any jit
    if _MULTI.value:
        kw = {}
        if _COORD.value:
            kw = dict(
                coordinator_address=_COORD.value,
                num_processes=_NPROC.value,
                process_id=_PID.value,
            )
        jax.distributed.initialize(**kw)
    from cga_jax.training.trainer import NonFiniteLossError, train_and_evaluate

    try:
        res = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    if jax.process_index() == 0:
        print({k: v for k, v in res.items()})


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
