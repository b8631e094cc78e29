"""The trainer: one mesh over all devices, data parallel, a pure jitted step, exact resume.

:func:`train_and_evaluate` reads top to bottom: check the config, build the data sources, the
:class:`Program` (model graphs, optimiser, schedule, jitted steps) and the initial state, resume
from the latest checkpoint, then per step: fetch a batch, train, log (stopping on a non-finite
loss), evaluate, checkpoint, and stop after a save when SIGTERM came.

The state is a plain pytree ``{"params", "batch_stats", "opt_state", "ema", "step", "rng"}``,
replicated over the mesh. Batches are per-process numpy arrays turned into global arrays sharded
over the ``data`` axis, so BN statistics cover the global batch. Step randomness is
``fold_in(rng, step)`` and the Grain iterator state is checkpointed, so a resumed run repeats an
uninterrupted one step for step, bit for bit on CPU (``tests/test_train_run.py``: kill -9, kill
during a checkpoint write, SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cga_jax.training import data as data_lib
from cga_jax.training.checkpoint import Checkpoints
from cga_jax.training.distill import build_teacher
from cga_jax.training.logger import Logger, Progress, plot_curves
from cga_jax.training.models import build_model
from cga_jax.training.optim import ema_init, make_optimizer
from cga_jax.training.prefetch import DevicePrefetcher
from cga_jax.training.schedule import make_schedule
from cga_jax.training.steps import make_eval_step, make_train_step
from cga_jax.training.validate import check_config

# what the steps read from a loader batch ("flip", "ra": data.device_aug's per-image parameters;
# "crop": data.device_resize's boxes in the canvases that "image" then holds)
BATCH_KEYS = ("image", "label", "valid", "erase", "flip", "ra", "crop")


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or infinite: the run stopped; its checkpoints are kept."""


@dataclasses.dataclass(frozen=True)
class Program:
    """What a run compiles once: the model's graphs, the optimiser, the schedule, the steps."""

    graphdef: nnx.GraphDef  # the model in train mode; the state's arrays are merged into it
    eval_graphdef: nnx.GraphDef  # the same model in eval mode
    rest: nnx.State  # model state that is neither a Param nor a BatchStat (constant)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable  # jitted (state, batch, teacher) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch_stats, batch) -> (correct, count)


def initial_state(params, batch_stats, tx: optax.GradientTransformation, seed: int) -> dict:
    """The train state at step 0 (the EMA starts as a copy of the model)."""
    return {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "ema": ema_init({"params": params, "batch_stats": batch_stats}),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def setup(
    cfg,
    *,
    num_classes: int,
    steps_per_epoch: int,
    mesh: Mesh,
    teacher_graphdef: nnx.GraphDef | None = None,
) -> tuple[Program, dict]:
    """The run's :class:`Program` and its initial state, replicated over ``mesh``.

    The student is ``cfg.model`` (with the distillation head when ``distill.kind`` is not
    "none"); weight decay skips the leaves its ``no_weight_decay()`` names.
    ``teacher_graphdef``: the teacher of :func:`~cga_jax.training.distill.build_teacher`.
    """
    model = build_model(
        cfg.model,
        img_size=cfg.img_size,
        num_classes=num_classes,
        distillation=cfg.model.distillation or cfg.distill.kind != "none",
        seed=cfg.seed,
        new_head=True,
    )
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    schedule = make_schedule(cfg.optim, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch)
    tx = make_optimizer(
        cfg.optim, params=params, schedule=schedule, no_weight_decay=model.no_weight_decay()
    )
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(initial_state(params, batch_stats, tx, cfg.seed), replicated)
    train_step = make_train_step(
        cfg,
        graphdef=graphdef,
        rest=rest,
        tx=tx,
        schedule=schedule,
        num_classes=num_classes,
        teacher_graphdef=teacher_graphdef,
    )
    eval_step = make_eval_step(cfg, graphdef=eval_graphdef, rest=rest)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    program = Program(
        graphdef=graphdef,
        eval_graphdef=eval_graphdef,
        rest=rest,
        tx=tx,
        schedule=schedule,
        train_step=jax.jit(
            train_step, donate_argnums=(0,), out_shardings=(state_sharding, replicated)
        ),
        eval_step=jax.jit(eval_step, out_shardings=(replicated, replicated)),
    )
    return program, state


def to_global(local: dict, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's part of a batch (numpy) -> global arrays sharded by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
        for k in BATCH_KEYS
        if k in local
    }


class Feeder:
    """The training input: this process's batches of the Grain loader as global arrays, put on
    the devices ``prefetch`` batches ahead of the step by a background thread
    (:class:`~cga_jax.training.prefetch.DevicePrefetcher`).

    ``wait_s`` sums the time the step waited for a batch; ``get_state`` / ``set_state`` are the
    loader's iterator state after the last batch *handed to the step* (what a checkpoint holds);
    ``set_state`` must come before the first ``next``."""

    def __init__(self, loader, sharding: NamedSharding, prefetch: int):
        self._iterator = iter(loader)
        self.sharding = sharding
        self.prefetch = prefetch
        self._feed: DevicePrefetcher | None = None
        self.wait_s = 0.0

    def next(self) -> dict[str, jax.Array]:
        if self._feed is None:
            to_device = functools.partial(to_global, sharding=self.sharding)
            self._feed = DevicePrefetcher(self._iterator, to_device, self.prefetch)
        batch = next(self._feed)
        self.wait_s += self._feed.take_wait()
        return batch

    def get_state(self) -> bytes:
        return self._iterator.get_state() if self._feed is None else self._feed.state

    def set_state(self, state: bytes) -> None:
        if self._feed is not None:
            raise RuntimeError("Feeder.set_state after the first batch")
        self._iterator.set_state(state)

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()


def evaluate(program: Program, models: dict, batches: Iterator[dict], sharding) -> dict:
    """Top-1 (%) of each of ``models`` (name -> ``{"params", "batch_stats"}``) over one pass of
    ``batches`` (every validation image once; padding has ``valid=0``)."""
    sums = {name: [0.0, 0.0] for name in models}
    for local in batches:
        batch = to_global(local, sharding)
        for name, m in models.items():
            correct, count = program.eval_step(m["params"], m["batch_stats"], batch)
            sums[name][0] += float(correct)
            sums[name][1] += float(count)
    return {name: 100.0 * c / max(n, 1.0) for name, (c, n) in sums.items()}


def write_metrics(pending: list, log: Logger, ckpts: Checkpoints) -> dict:
    """Log the metrics of the steps in ``pending`` (``(step, metrics)`` on the device; one
    transfer) and return the last. At a non-finite loss, wait for the saves in flight and raise
    :class:`NonFiniteLossError` naming the last good checkpoint."""
    for step, metrics in jax.device_get(pending):
        if not np.isfinite(metrics["train_loss"]):
            ckpts.wait()
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['train_loss']}) at step {step}: stopping; the last "
                f"good checkpoint is step {ckpts.latest_step()} in {ckpts.directory}"
            )
        log.write(step, **metrics)
    return metrics


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An event that SIGTERM sets (a preempted VM) while the block runs."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Train per ``cfg`` in ``workdir``, resuming from its latest checkpoint.

    Returns the final metrics: ``val_top1``, ``val_top1_ema`` (of the last evaluation), ``best``,
    ``step``, ``checkpoint`` (directory), ``curves`` (PNG; process 0), ``preempted`` (after
    SIGTERM). Raises :class:`~cga_jax.training.validate.ConfigError` for an invalid config,
    before anything is built, and :class:`NonFiniteLossError` when the loss is not finite.
    """
    check_config(cfg)
    devices = jax.device_count()
    if cfg.batch_size % devices or cfg.eval_batch_size % devices:
        raise ValueError(f"batch sizes must divide by the {devices} devices")
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    pid, nproc = jax.process_index(), jax.process_count()
    main = pid == 0

    train_src, val_src = data_lib.make_source(cfg, "train"), data_lib.make_source(cfg, "val")
    num_classes = cfg.model.num_classes or train_src.num_classes
    steps_per_epoch = max(1, len(train_src) // cfg.batch_size)
    epochs = cfg.optim.epochs + cfg.optim.cooldown_epochs
    total_steps = cfg.total_steps or int(round(epochs * steps_per_epoch))
    teacher = build_teacher(cfg, num_classes=num_classes)  # None without distillation
    program, state = setup(
        cfg,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
        teacher_graphdef=None if teacher is None else teacher.graphdef,
    )
    replicated = NamedSharding(mesh, P())  # the teacher is a non-donated argument of the step
    teacher_state = None if teacher is None else jax.device_put(teacher.state, replicated)
    feeder = Feeder(
        data_lib.train_loader(cfg, train_src, pid, nproc, seed=cfg.seed),
        batch_sharding,
        cfg.data.prefetch,
    )

    ckpts = Checkpoints(workdir, cfg.keep_checkpoints)
    start, best = 0, -1.0
    resumed = ckpts.restore_latest(state)
    if resumed is not None:
        state, data_state, start, best = resumed
        if data_state is not None:
            feeder.set_state(data_state)
        if main:
            print(f"resumed from {ckpts.directory} step {start}")

    log = Logger(workdir, main)
    progress = Progress(main and cfg.progress, total_steps, start, cfg.batch_size)
    pending: list = []  # (step, metrics) not logged yet: the device runs ahead of the host
    result: dict = {}
    try:
        with sigterm_flag() as sigterm:
            for step in range(start + 1, total_steps + 1):
                state, metrics = program.train_step(state, feeder.next(), teacher_state)
                pending.append((step, metrics))
                stop = sigterm.is_set()
                last = step == total_steps
                evaluate_now = step % cfg.eval_every == 0 or last
                save_now = step % cfg.checkpoint_every == 0 or last or stop

                if step % cfg.log_every == 0 or evaluate_now or save_now:
                    loss = write_metrics(pending, log, ckpts)["train_loss"]
                    log.write(step, input_wait=progress.report(step, loss, feeder.wait_s))
                    pending = []
                progress.advance()

                if evaluate_now:
                    models = {"val_top1": state, "val_top1_ema": state["ema"].ema}
                    batches = data_lib.eval_batches(cfg, val_src, pid, nproc)
                    top1 = evaluate(program, models, batches, batch_sharding)
                    log.write(step, **top1)
                    result.update(top1)
                    progress.write(
                        f"step {step}: val top-1 {top1['val_top1']:.2f}% "
                        f"(EMA {top1['val_top1_ema']:.2f}%)"
                    )
                    if top1["val_top1"] > best:
                        best = top1["val_top1"]
                        ckpts.save_best(step, state, best)

                if save_now:
                    ckpts.save(step, state, feeder.get_state(), best)

                if stop:
                    ckpts.wait()
                    if main:
                        print(f"SIGTERM: saved step {step} to {ckpts.directory}; exiting")
                    result["preempted"] = True
                    break
    finally:
        feeder.close()
        ckpts.wait()
        progress.close()
        log.close()
    result.update(step=int(state["step"]), checkpoint=ckpts.directory, best=best)
    if main and os.path.exists(log.path):
        result["curves"] = plot_curves(log.path, os.path.join(workdir, "curves.png"))
    return result
