"""A tiny EfficientViT on scikit-learn's 8x8 digits upscaled to 32 px RGB (the ``make demo`` run).

    python train.py --config configs/digits.py --workdir /tmp/digits

Expected: validation top-1 >= 95% (360 held-out images) in a few minutes on 2 CPU cores.
``configs/digits.py:runlocal`` runs 30 steps. The config itself is
:func:`cga_jax.training.recipe.digits` (packaged, so that ``python -m cga_jax.demo`` runs from an
installed wheel).
"""

from __future__ import annotations

import ml_collections

from cga_jax.training.recipe import digits


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "runlocal"):
        raise ValueError(f"configs/digits.py takes '' or 'runlocal', got {arg!r}")
    return digits(runlocal=arg == "runlocal")
