"""The start-up check of a training config: its keys against the recipe's, then its values.

:func:`check_config` runs before anything is built or compiled and raises one
:class:`ConfigError` that lists every problem, one per line: a key the recipe does not have (with
the closest name it does have), a missing key, a value of the wrong type, a name outside its
choices (``compute_dtype``, ``distill.kind``, ``data.name``, ...), a malformed RandAugment
spec, a number out of range, a model spec that names no variant or an inconsistent architecture.
"""

from __future__ import annotations

import difflib

import ml_collections

from cga_jax.training.data import AUG_MODES, DECODE_MODES, SOURCES
from cga_jax.training.distill import KINDS
from cga_jax.training.models import model_config
from cga_jax.training.randaugment import INTERPOLATIONS, parse_rand_augment
from cga_jax.training.recipe import imagenet_recipe
from cga_jax.training.steps import COMPUTE_DTYPES


class ConfigError(ValueError):
    """A training config that does not fit the recipe's schema or has invalid values."""


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming every key of ``cfg`` that is unknown, missing, of the
    wrong type or out of range; return None for a valid config."""
    problems = schema_problems(cfg, imagenet_recipe())
    if not problems:  # the value checks read every key: only once they all exist
        problems = value_problems(cfg)
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))


def schema_problems(cfg, schema, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that ``schema`` lacks, keys it lacks, and values of another type (a
    None in the schema, an optional model field, takes any value: the model check sees it)."""
    out = []
    for key in sorted(set(cfg.keys()) | set(schema.keys())):
        path = prefix + key
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema.keys()), n=1)
            out.append(
                f"unknown key {path}" + (f" (did you mean {prefix}{near[0]}?)" if near else "")
            )
        elif key not in cfg:
            out.append(f"missing key {path}")
        elif isinstance(schema[key], ml_collections.ConfigDict):
            if isinstance(cfg[key], ml_collections.ConfigDict):
                out += schema_problems(cfg[key], schema[key], path + ".")
            else:
                out.append(
                    f"{path}={cfg[key]!r}: expected a group of keys ({', '.join(schema[key])})"
                )
        elif schema[key] is not None and not _same_kind(cfg[key], schema[key]):
            out.append(f"{path}={cfg[key]!r}: expected a {type(schema[key]).__name__}")
    return out


def _same_kind(value, ref) -> bool:
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if isinstance(ref, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ref, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(ref, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(ref))


def value_problems(cfg) -> list[str]:
    """Choices, ranges and the model specs of a config whose keys match the recipe."""
    out: list[str] = []

    def need(ok: bool, path: str, value, what: str) -> None:
        if not ok:
            out.append(f"{path}={value!r}: {what}")

    def choice(path: str, value, allowed) -> None:
        need(value in allowed, path, value, "must be one of " + ", ".join(map(repr, allowed)))

    def at_least(path: str, value, low) -> None:
        need(value >= low, path, value, f"must be >= {low}")

    def fraction(path: str, value) -> None:
        need(0.0 <= value <= 1.0, path, value, "must be in [0, 1]")

    d, o, a, k = cfg.data, cfg.optim, cfg.aug, cfg.distill
    choice("compute_dtype", cfg.compute_dtype, tuple(COMPUTE_DTYPES))
    choice("distill.kind", k.kind, KINDS)
    choice("data.name", d.name, SOURCES)
    choice("data.aug", d.aug, AUG_MODES)
    choice("data.decode", d.decode, DECODE_MODES)
    choice("data.interpolation", d.interpolation, INTERPOLATIONS)
    if d.device_resize and not (d.decode == "fast" and d.device_aug and d.aug == "rrc_flip"):
        out.append(
            f"data.device_resize=True: needs data.decode='fast', data.device_aug=True and "
            f"data.aug='rrc_flip' (got {d.decode!r}, {d.device_aug!r}, {d.aug!r})"
        )
    if d.randaugment:
        try:
            parse_rand_augment(d.randaugment)
        except ValueError as e:
            out.append(f"data.randaugment={d.randaugment!r}: {e}")
    positive = ("img_size", "batch_size", "eval_batch_size", "log_every", "eval_every")
    for path in (*positive, "checkpoint_every", "keep_checkpoints"):
        at_least(path, cfg[path], 1)
    at_least("total_steps", cfg.total_steps, 0)
    at_least("data.workers", d.workers, 0)
    at_least("data.read_threads", d.read_threads, 0)
    at_least("data.prefetch", d.prefetch, 1)
    at_least("data.repeated_aug", d.repeated_aug, 1)
    fraction("data.hflip", d.hflip)
    fraction("data.reprob", d.reprob)
    fraction("aug.mixup_switch_prob", a.mixup_switch_prob)
    fraction("aug.mixup_prob", a.mixup_prob)
    fraction("ema_decay", cfg.ema_decay)
    fraction("distill.alpha", k.alpha)
    need(
        0.0 <= a.label_smoothing < 1.0,
        "aug.label_smoothing",
        a.label_smoothing,
        "must be in [0, 1)",
    )
    at_least("aug.mixup", a.mixup, 0.0)
    at_least("aug.cutmix", a.cutmix, 0.0)
    need(k.tau > 0, "distill.tau", k.tau, "must be > 0")
    need(0.0 < d.crop_pct <= 1.0, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
    scale = tuple(d.rrc_scale)
    need(
        len(scale) == 2 and _numbers(scale) and 0.0 < scale[0] <= scale[1] <= 1.0,
        "data.rrc_scale",
        d.rrc_scale,
        "must be (low, high) with 0 < low <= high <= 1",
    )
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.epochs > 0, "optim.epochs", o.epochs, "must be > 0")
    for name in ("warmup_epochs", "cooldown_epochs", "warmup_lr", "min_lr", "weight_decay"):
        at_least(f"optim.{name}", o[name], 0.0)
    at_least("optim.clip_grad", o.clip_grad, 0.0)
    need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    need(
        len(o.betas) == 2 and _numbers(o.betas) and all(0.0 <= b < 1.0 for b in o.betas),
        "optim.betas",
        o.betas,
        "must be two numbers in [0, 1)",
    )
    out += _model_problems("model", cfg.model, cfg, cfg.model.distillation or k.kind != "none")
    if k.kind in KINDS and k.kind != "none":
        if not k.teacher.name:
            out.append(f"distill.teacher.name='': distill.kind={k.kind!r} needs a teacher model")
        else:
            out += _model_problems("distill.teacher", k.teacher, cfg, k.teacher.distillation)
        if k.teacher.num_classes is not None:
            out.append(
                f"distill.teacher.num_classes={k.teacher.num_classes!r}: must be None (the "
                "teacher has the student's classes)"
            )
    return out


def _numbers(values) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _model_problems(path: str, spec, cfg, distillation: bool) -> list[str]:
    n = spec.num_classes
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        return [f"{path}.num_classes={n!r}: must be an int >= 1 (None: the data's)"]
    try:
        model_config(
            spec,
            img_size=cfg.img_size,
            num_classes=spec.num_classes or 1,
            distillation=distillation,
        )
    except (ValueError, TypeError) as e:
        return [f"{path}: {e}"]
    return []
