"""A tiny EfficientViT on scikit-learn's 8x8 digits upscaled to 32 px RGB (the ``make demo`` run).

    python train.py --config configs/digits.py --workdir /tmp/digits

Expected: validation top-1 >= 95% (360 held-out images) in a few minutes on 2 CPU cores.
``configs/digits.py:runlocal`` runs 30 steps.
"""

from __future__ import annotations

import ml_collections

from configs.common import imagenet_recipe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = imagenet_recipe()
    c.img_size = 32
    c.batch_size = 64
    c.eval_batch_size = 120
    c.model = ml_collections.ConfigDict(
        dict(
            embed_dim=(32, 48, 64),
            key_dim=(8, 8, 8),
            depth=(1, 1, 1),
            num_heads=(2, 2, 2),
            window_size=(2, 2, 2),
            kernels=(3, 3),
            num_classes=10,
        )
    )
    # no crop/flip/RandAugment/erasing/repeats: 8x8 digits are too small for them (flips and
    # rotations change the digit); the ImageNet recipe's augmentation is exercised by the tests
    c.data = ml_collections.ConfigDict(
        dict(
            name="digits",
            workers=0,
            aug="none",
            crop_pct=1.0,  # validation images are already img_size: no resize, no crop
            split_seed=0,
            randaugment="",
            reprob=0.0,
            repeated_aug=1,
        )
    )
    c.optim.lr = 0.02  # x 64/512 -> 2.5e-3
    c.optim.epochs = 20
    c.optim.warmup_epochs = 2
    c.optim.cooldown_epochs = 0
    c.aug.mixup = 0.0
    c.aug.cutmix = 0.0
    c.ema_decay = 0.99
    c.log_every = 10
    c.eval_every = 110
    c.checkpoint_every = 110
    c.progress = True
    if arg == "runlocal":
        c.total_steps = 30
        c.eval_every = c.checkpoint_every = 30
    return c
