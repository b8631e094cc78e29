"""The official EfficientViT ImageNet recipe (Cream ``classification/main.py`` defaults)."""

from __future__ import annotations

import os

import ml_collections


def imagenet_recipe() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.img_size = 224
    c.batch_size = 2048  # global
    c.eval_batch_size = 1024
    c.total_steps = 0  # 0: (optim.epochs + optim.cooldown_epochs) * steps_per_epoch
    c.compute_dtype = "float32"  # or "bfloat16" (f32 params and BN statistics)
    c.model = ml_collections.ConfigDict(dict(name="efficientvit_m0", pretrained="", num_classes=0))
    c.data = ml_collections.ConfigDict(
        dict(
            name="folder",
            root="/data/imagenet",
            train_dir="train",
            val_dir="val",
            # Grain worker processes: this host's cores less one (the step and the prefetch
            # thread); with several training processes per host, divide by their number
            workers=max(1, len(os.sched_getaffinity(0)) - 1),
            prefetch=2,  # batches on the devices ahead of the step
            decode="fast",  # "exact": full decode + resample as timm (pixel-equal)
            device_aug=True,  # flip + RandAugment inside the jitted step; False: on the host
            aug="rrc_flip",
            rrc_scale=(0.08, 1.0),
            hflip=0.5,
            crop_pct=224 / 256,
            randaugment="rand-m9-mstd0.5-inc1",  # timm RandAugment spec; "" for none
            interpolation="bicubic",  # RandAugment's geometric ops (--train-interpolation)
            reprob=0.25,  # random erasing, 'pixel' mode, one box
            repeated_aug=3,  # DeiT RASampler copies per image; 1 for none
        )
    )
    # DeiT knowledge distillation (--distillation-type/-alpha/-tau; the official default "none").
    # teacher: a create_model name (or a dict of EfficientViTConfig fields) with weights in
    # teacher_pretrained; the official teacher, RegNetY-160, is not available here.
    c.distill = ml_collections.ConfigDict(
        dict(kind="none", teacher="", teacher_pretrained="", alpha=0.5, tau=1.0)
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,  # scaled by batch_size / 512
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.025,
            clip_grad=0.02,
            epochs=300.0,
            warmup_epochs=5.0,
            warmup_lr=1e-6,
            min_lr=1e-5,
            cooldown_epochs=10.0,
        )
    )
    c.aug = ml_collections.ConfigDict(
        dict(label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, mixup_prob=1.0)
    )
    c.ema_decay = 0.99996
    c.log_every = 50
    c.eval_every = 5000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.progress = True
    return c
