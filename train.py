"""Train EfficientViT: ``python train.py --config configs/efficientvit.py:m0 --workdir DIR``.

Any config field can be overridden, e.g. ``--config.optim.lr=2e-3 --config.batch_size=1024``. The
config is checked before anything is built: an override of a key the config lacks, or an invalid
value, stops the run with one message (exit code 1 for flags, 2 for values). A non-finite loss
stops it with exit code 3.

Several processes (multi-host GPU/TPU) only with ``--multiprocess``: it calls
``jax.distributed.initialize()``, which finds its settings itself where JAX's cluster detection
knows the environment (Cloud TPU, SLURM, Open MPI, ...); elsewhere add ``--coordinator host:port
--num_processes N --process_id i``. Without ``--multiprocess`` the run is one process.
"""

from __future__ import annotations

import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import cga_jax
from cga_jax.training.trainer import NonFiniteLossError, train_and_evaluate
from cga_jax.training.validate import ConfigError, check_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path.py:variant)")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and curves go here")
_MULTI = flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize()")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --multiprocess)")
_NPROC = flags.DEFINE_integer("num_processes", None, "process count (with --coordinator)")
_PID = flags.DEFINE_integer("process_id", None, "this process's id (with --coordinator)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but an override of a key the config lacks (``--config.optim.lrr=1``),
    which ml_collections raises as a KeyError traceback, becomes one line and exit code 1."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        detail = e
        while isinstance(detail, BaseException) and detail.args:  # the innermost KeyError's text
            detail = detail.args[0]
        found = re.match(r"'(\w+)'\s*(.*)", str(detail), re.S)
        key, hint = found.groups() if found else ("?", "")
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        named = [g for g in given if key in g.split(".")] or given
        sys.stderr.write(
            f"FATAL Flags parsing error: {', '.join(named)}: the config has no key {key!r}. {hint}\n"
        )
        sys.exit(1)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        check_config(_CONFIG.value)
    except ConfigError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
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
    try:
        res = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    if jax.process_index() == 0:
        print(dict(res))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
