"""EfficientViT M0-M5 on ImageNet-1k with the official recipe.

    python train.py --config configs/efficientvit.py:m0 --workdir /ckpt/m0 \
        --config.data.root=/data/imagenet

Expected (paper, 300 epochs, global batch 2048): top-1 M0 63.2, M1 68.4, M2 70.8, M3 73.4,
M4 74.3, M5 77.1. ``:m0,runlocal`` is a tiny smoke run on the bundled digits data. The recipe is
:func:`cga_jax.training.recipe.imagenet_recipe`.
"""

from __future__ import annotations

import ml_collections

from cga_jax.training.recipe import imagenet_recipe


def get_config(arg: str = "m0") -> ml_collections.ConfigDict:
    variant, _, opt = arg.partition(",")
    if opt not in ("", "runlocal"):
        raise ValueError(f"configs/efficientvit.py takes 'mN' or 'mN,runlocal', got {arg!r}")
    c = imagenet_recipe()
    c.model.name = f"efficientvit_{variant}"
    if opt == "runlocal":
        c.img_size = 64
        c.batch_size = c.eval_batch_size = 32
        c.data.name = "digits"
        c.data.workers = 0
        c.total_steps = 4
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
