"""The trainer: one mesh over all devices, data parallel, a pure jitted step, exact resume.

State is a plain pytree ``{"params", "batch_stats", "opt_state", "ema", "step", "rng"}``
(replicated); the model graph is split once and merged inside the jitted step. Batches are
per-process numpy arrays turned into global arrays sharded over the ``data`` axis, so BN
statistics cover the global batch. Step randomness (mixup/cutmix) is ``fold_in(rng, step)`` and the
Grain iterator state is checkpointed, so a resumed run repeats an uninterrupted one step for step,
bit for bit on CPU (``tests/test_train_run.py``: kill -9, kill during a checkpoint write, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cga_jax.training import checkpoint as ckpt
from cga_jax.training import data as data_lib
from cga_jax.training.device_augment import augment as device_augment
from cga_jax.training.distill import build_teacher, distillation_loss
from cga_jax.training.erasing import apply_erase
from cga_jax.training.logger import Logger, plot_curves
from cga_jax.training.mixup import mix_batch, smooth_one_hot
from cga_jax.training.optim import ema_init, ema_update, make_optimizer, make_schedule
from cga_jax.training.prefetch import DevicePrefetcher


class NonFiniteLossError(FloatingPointError):
    pass


def build_model(cfg, num_classes: int) -> nnx.Module:
    from cga_jax import EfficientViTConfig, create_model

    m = cfg.model
    rngs = nnx.Rngs(cfg.seed)
    # a teacher needs the distillation head (DeiT builds the model with distillation=True then)
    dist = (
        bool(m.get("distillation", False)) or cfg.get("distill", {}).get("kind", "none") != "none"
    )
    if m.get("name"):
        kw = dict(num_classes=num_classes, img_size=cfg.img_size, rngs=rngs)
        if dist:
            kw["distillation"] = True
        return create_model(m.name, pretrained=m.get("pretrained") or None, **kw)
    fields = {k: v for k, v in m.to_dict().items() if k not in ("name", "pretrained")}
    fields.update(num_classes=num_classes, img_size=cfg.img_size, distillation=dist)
    from cga_jax import EfficientViT

    return EfficientViT(EfficientViTConfig(**fields), rngs=rngs)


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def make_steps(
    cfg, graphdef, eval_graphdef, rest, tx, schedule, num_classes: int, teacher_graphdef=None
):
    """-> (train_step(state, batch, teacher=None) -> (state, metrics),
    eval_step(params, stats, batch)). ``teacher``: the teacher's state (with
    ``teacher_graphdef``, from :func:`~cga_jax.training.distill.build_teacher`)."""
    dtype = jnp.bfloat16 if cfg.get("compute_dtype", "float32") == "bfloat16" else jnp.float32
    aug = cfg.aug
    dc = cfg.get("distill", {})
    kind, alpha, tau = dc.get("kind", "none"), dc.get("alpha", 0.5), dc.get("tau", 1.0)

    def train_step(state, batch, teacher=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        images = batch["image"]
        if "flip" in batch or "ra" in batch:  # data.device_aug: flip + RandAugment here
            images = device_augment(batch)
        x = data_lib.normalize(images)
        if "erase" in batch:  # random erasing, after normalisation (boxes drawn by the loader)
            x = apply_erase(jax.random.fold_in(key, 1), x, batch["erase"])
        valid = batch["valid"].astype(jnp.float32)
        targets = smooth_one_hot(batch["label"], num_classes, aug.label_smoothing)
        x, targets = mix_batch(
            key, x, targets, aug.mixup, aug.cutmix, aug.mixup_switch_prob, aug.mixup_prob
        )
        t_logits = None
        if teacher is not None:  # eval mode, no gradient, the same (mixed) images as DeiT
            tm = nnx.merge(teacher_graphdef, _cast(teacher[0], dtype), teacher[1], copy=True)
            t_logits = jax.lax.stop_gradient(tm(x.astype(dtype)))

        def loss_fn(params):
            m = nnx.merge(graphdef, _cast(params, dtype), state["batch_stats"], rest, copy=True)
            out = m(x.astype(dtype))
            logits, logits_dist = out if isinstance(out, tuple) else (out, None)
            loss = distillation_loss(
                logits, logits_dist, t_logits, targets, valid, kind, alpha, tau
            )
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        _, ema = ema_update(
            cfg.ema_decay, {"params": params, "batch_stats": new_stats}, state["ema"]
        )
        metrics = {
            "train_loss": loss,
            "lr": schedule(state["step"]),
            "grad_norm": optax.global_norm(grads),
            "bad_images": jnp.sum(1.0 - valid),
        }
        new_state = dict(
            state,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            ema=ema,
            step=state["step"] + 1,
        )
        return new_state, metrics

    def eval_step(params, stats, batch):
        m = nnx.merge(eval_graphdef, _cast(params, dtype), stats, rest, copy=True)
        logits = m(data_lib.normalize(batch["image"]).astype(dtype))
        valid = batch["valid"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * valid
        return jnp.sum(correct), jnp.sum(valid)

    return train_step, eval_step


def setup(cfg, num_classes: int, steps_per_epoch: int):
    """Model graph and initial state. -> (graphdef, eval_graphdef, rest, tx, schedule, state)."""
    model = build_model(cfg, num_classes)
    model.train()
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    schedule = make_schedule(cfg, steps_per_epoch)
    tx = make_optimizer(cfg, params, schedule)
    state = {
        "params": params,
        "batch_stats": stats,
        "opt_state": tx.init(params),
        "ema": ema_init({"params": params, "batch_stats": stats}),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(cfg.seed)),
    }
    return graphdef, eval_graphdef, rest, tx, schedule, state


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Train per ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns the final
    metrics: ``val_top1``, ``val_top1_ema``, ``step``, ``checkpoint`` (dir), ``curves`` (png)."""
    pid, nproc = jax.process_index(), jax.process_count()
    main = pid == 0
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    if cfg.batch_size % jax.device_count() or cfg.eval_batch_size % jax.device_count():
        raise ValueError(f"batch sizes must divide by the {jax.device_count()} devices")

    train_src = data_lib.make_source(cfg, "train")
    val_src = data_lib.make_source(cfg, "val")
    num_classes = cfg.model.get("num_classes") or train_src.num_classes
    steps_per_epoch = max(1, len(train_src) // cfg.batch_size)
    o = cfg.optim
    total_steps = cfg.get("total_steps") or int(
        round((o.epochs + o.cooldown_epochs) * steps_per_epoch)
    )
    graphdef, eval_graphdef, rest, tx, schedule, state = setup(cfg, num_classes, steps_per_epoch)
    state = jax.device_put(state, repl)

    teacher = build_teacher(cfg, num_classes)
    t_graphdef, t_state = teacher if teacher is not None else (None, None)
    if t_state is not None:  # a non-donated argument of the step, replicated like the params
        t_state = jax.device_put(t_state, repl)
    train_step, eval_step = make_steps(
        cfg, graphdef, eval_graphdef, rest, tx, schedule, num_classes, t_graphdef
    )
    state_sh = jax.tree.map(lambda _: repl, state)
    p_train = jax.jit(
        train_step,
        donate_argnums=(0,),
        out_shardings=(state_sh, repl),
    )
    p_eval = jax.jit(eval_step, out_shardings=(repl, repl))

    loader = data_lib.train_loader(cfg, train_src, pid, nproc, seed=cfg.seed)
    it = iter(loader)
    mngr = ckpt.make_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    best_mngr = ckpt.make_manager(os.path.join(workdir, "best"), 1, name="best")
    best = -1.0
    start = 0
    if mngr.latest_step() is not None:
        state, data_state, meta = ckpt.restore(mngr, mngr.latest_step(), state)
        if data_state is not None:
            it.set_state(data_state)
        start, best = int(meta["step"]), float(meta.get("best", -1.0))
        if main:
            print(f"resumed from {mngr.directory} step {start}")

    log = Logger(workdir, main)
    preempted = []
    old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

    def to_global(local):
        return {
            k: jax.make_array_from_process_local_data(data_sh, np.asarray(local[k]))
            for k in ("image", "label", "valid", "erase", "flip", "ra")
            if k in local
        }

    def evaluate(params_stats) -> float:
        correct = count = 0.0
        for local in data_lib.eval_batches(cfg, val_src, pid, nproc):
            c, n = p_eval(params_stats["params"], params_stats["batch_stats"], to_global(local))
            correct, count = correct + float(c), count + float(n)
        return 100.0 * correct / max(count, 1.0)

    # batches go to the devices ahead of the step; feed.state is the loader state of the last
    # batch the step took (what a checkpoint must hold), feed.take_wait() its input wait
    feed = DevicePrefetcher(it, to_global, cfg.data.get("prefetch", 2))

    def save(step: int, best_val: float) -> None:
        ckpt.save(mngr, step, state, feed.state, {"step": step, "best": best_val})

    bar = None
    if main and cfg.get("progress", True):
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)
    pending: list = []
    result: dict = {}
    t_last, n_last = time.perf_counter(), 0
    try:
        for step in range(start, total_steps):
            state, metrics = p_train(state, next(feed), t_state)
            pending.append((step + 1, metrics))
            s = step + 1
            do_eval = s % cfg.eval_every == 0 or s == total_steps
            do_save = s % cfg.checkpoint_every == 0 or s == total_steps or bool(preempted)
            if s % cfg.log_every == 0 or do_eval or do_save:
                for ps, pm in jax.device_get(pending):
                    if not np.isfinite(pm["train_loss"]):
                        mngr.wait_until_finished()
                        raise NonFiniteLossError(
                            f"non-finite loss ({pm['train_loss']}) at step {ps}: stopping; the last "
                            f"good checkpoint is step {mngr.latest_step()} in {mngr.directory}"
                        )
                    log.write(ps, **pm)
                dt = time.perf_counter() - t_last
                ips = (s - start - n_last) * cfg.batch_size / max(dt, 1e-9)
                # share of the window's wall time the loop waited for input (0: never)
                log.write(s, input_wait=min(1.0, feed.take_wait() / max(dt, 1e-9)))
                t_last, n_last = time.perf_counter(), s - start
                if bar is not None:
                    bar.set_postfix(loss=f"{pending[-1][1]['train_loss']:.4f}", img_s=f"{ips:.0f}")
                pending = []
            if bar is not None:
                bar.update(1)
            if do_eval:
                top1 = evaluate(state)
                top1_ema = evaluate(state["ema"].ema)
                log.write(s, val_top1=top1, val_top1_ema=top1_ema)
                result.update(val_top1=top1, val_top1_ema=top1_ema)
                if main and bar is not None:
                    bar.write(f"step {s}: val top-1 {top1:.2f}% (EMA {top1_ema:.2f}%)")
                if top1 > best:
                    best = top1
                    ckpt.save(best_mngr, s, state, None, {"step": s, "val_top1": top1})
            if do_save:
                save(s, best)
            if preempted:
                mngr.wait_until_finished()
                if main:
                    print(f"SIGTERM: saved step {s} to {mngr.directory}; exiting")
                result["preempted"] = True
                break
    finally:
        feed.close()
        mngr.wait_until_finished()
        best_mngr.wait_until_finished()
        signal.signal(signal.SIGTERM, old_handler)
        if bar is not None:
            bar.close()
        log.close()
    result.update(step=int(state["step"]), checkpoint=str(mngr.directory), best=best)
    if main and os.path.exists(log.path):
        result["curves"] = plot_curves(log.path, os.path.join(workdir, "curves.png"))
    return result
