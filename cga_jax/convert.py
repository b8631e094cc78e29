"""Convert an official / timm PyTorch checkpoint into a cga_jax checkpoint directory.

Output directory: ``model.safetensors`` (the Flax state, keys are dotted Flax paths, float32)
and/or ``orbax/`` (the same state as an Orbax checkpoint of a nested dict, keys = path parts;
``fmt='orbax'`` or ``'both'``), and ``config.json`` (model name, :class:`EfficientViTConfig`
fields, source, notes, and the PyTorch ``num_batches_tracked`` values so that
:func:`cga_jax.export_torch` gives the file back bitwise). Written through
:func:`cga_jax.checkpoint_io.write_converted`: on any error nothing is left behind.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cga_jax.checkpoint_io import check_format, check_out_dir, read_state_dict, write_converted
from cga_jax.download import resolve_source
from cga_jax.errors import CheckpointError
from cga_jax.factory import create_model, get_config
from cga_jax.keymap import dotted, flat_state
from cga_jax.loading import guess_variant, load_state_dict, state_dict_to_timm


def convert(
    model_name: str,
    src: str,
    out: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    fmt: str = "safetensors",
) -> list[str]:
    """Convert ``src`` (a file, a URL, ``official:<model>`` or ``hf-hub:<org>/<name>``; read
    once) for ``model_name`` into the directory ``out``; returns notes.

    ``fmt``: ``'safetensors'`` (``model.safetensors``), ``'orbax'`` (``orbax/``) or ``'both'``.
    Raises :class:`CheckpointError` (one message naming every problem) and writes nothing.
    """
    check_format(fmt)
    try:
        get_config(model_name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    check_out_dir(out)
    path = resolve_source(src)
    sd, notes = read_state_dict(path)
    timm_sd, layout = state_dict_to_timm(sd)
    guess = guess_variant(timm_sd)
    base = model_name.partition(".")[0]
    if guess is not None and guess != base:
        raise CheckpointError(
            f"{path}: this checkpoint looks like {guess} (its shapes match {guess} exactly), not "
            f"{model_name}; pass --model {guess}"
        )
    try:
        model = create_model(model_name, num_classes=num_classes, img_size=img_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    head = timm_sd.get("head.linear.weight")
    if num_classes is None and guess == base and head is not None:
        if head.shape[0] != model.num_classes:
            raise CheckpointError(
                f"{path}: the checkpoint's classifier has {head.shape[0]} classes, {model_name} "
                f"has {model.num_classes}; pass --num-classes N to drop the classifier "
                "(fine-tuning)"
            )
    notes += load_state_dict(model, timm_sd, new_head=num_classes is not None, source=path)
    meta = {
        "model": model_name,
        "config": dataclasses.asdict(model.cfg),
        "source": src,
        "source_layout": layout,
        "num_batches_tracked": {
            k: int(v) for k, v in timm_sd.items() if k.endswith("num_batches_tracked")
        },
        "notes": notes,
        "format": fmt,
    }
    flat = {dotted(p): np.asarray(v, np.float32) for p, v in flat_state(model).items()}
    write_converted(out, flat, meta, fmt)
    return notes
