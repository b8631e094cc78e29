"""The training configs: the official ImageNet recipe, which is also the schema, and the digits demo.

:func:`imagenet_recipe` holds every key a training config has, at the values of the official code
(Cream ``classification/main.py``). Other configs (``configs/*.py``, :func:`digits`) start from it
and change single fields. The configs come back locked (``ConfigDict.lock``): setting a key the
recipe lacks raises, in a config file and in a ``--config.a.b=`` override alike.
:func:`cga_jax.training.validate.check_config` checks the values at start-up.

The demo config lives here, inside the package, so that ``python -m cga_jax.demo`` runs from an
installed wheel; ``configs/digits.py`` returns the same config to ``train.py``.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from cga_jax import EfficientViTConfig

# EfficientViTConfig fields that the trainer sets itself: the resolution is ``cfg.img_size``; the
# class count and the distillation head are the spec's, resolved against the data and the run
RUN_FIELDS = ("img_size", "num_classes", "distillation")
ARCH_FIELDS = tuple(
    f.name for f in dataclasses.fields(EfficientViTConfig) if f.name not in RUN_FIELDS
)


def model_spec(name: str = "") -> ml_collections.ConfigDict:
    """A model the trainer builds, the student (``model``) or the teacher (``distill.teacher``).

    ``name``: a :func:`cga_jax.create_model` name; ``pretrained``: its weights ("" for none);
    ``num_classes``: None for the number of classes of the training data; ``distillation``: add
    the DeiT distillation head (the student gets it anyway when ``distill.kind`` is not "none").
    Every other :class:`~cga_jax.EfficientViTConfig` field (``embed_dim``, ``depth``, ...)
    overrides the named variant's value; None keeps it.
    """
    s = ml_collections.ConfigDict()
    s.name = name
    s.pretrained = ""
    s.num_classes = config_dict.placeholder(int)
    s.distillation = False
    defaults = {f.name: f.default for f in dataclasses.fields(EfficientViTConfig)}
    for field in ARCH_FIELDS:
        s[field] = config_dict.placeholder(type(defaults[field]))
    return s


def imagenet_recipe() -> ml_collections.ConfigDict:
    """EfficientViT-M0 on ImageNet-1k with the official recipe (global batch 2048, 300 epochs)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.img_size = 224
    c.batch_size = 2048  # global
    c.eval_batch_size = 1024
    c.total_steps = 0  # 0: (optim.epochs + optim.cooldown_epochs) * steps_per_epoch
    c.compute_dtype = "float32"  # or "bfloat16" (float32 params and BN statistics)
    c.model = model_spec("efficientvit_m0")
    c.data = ml_collections.ConfigDict(
        dict(
            # "folder" (root/<split_dir>/<class>/<image>), "tar", "arrayrecord" (``cga-jax pack``
            # shards; a shard directory is recognised under any name) or "digits"
            name="folder",
            root="/data/imagenet",
            train_dir="train",
            val_dir="val",
            split_seed=0,  # "digits": the seed of the fixed train/validation split
            # Grain worker processes (0: decode in the training process): this host's cores
            # less one (the step and the prefetch thread); divide by the processes per host
            workers=max(1, len(os.sched_getaffinity(0)) - 1),
            read_threads=0,  # Grain record-reading threads (> 0 for slow, remote storage)
            prefetch=2,  # batches put on the devices ahead of the step
            decode="fast",  # reduced JPEG decode of the crop box; "exact": full decode as timm
            device_aug=True,  # flip + RandAugment inside the jitted step; False: on the host
            # the bicubic resample of the crop box inside the jitted step too (decode="fast",
            # device_aug=True): the host ships the decoded box in a fixed uint8 canvas; off by
            # default: its dense resize costs the device about as much as M0's step (docs)
            device_resize=False,
            aug="rrc_flip",  # random-resized-crop + flip, or "none" (resize only)
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
    # The official teacher, RegNetY-160, is a timm model: here the teacher is a cga_jax model.
    c.distill = ml_collections.ConfigDict(
        dict(kind="none", teacher=model_spec(), alpha=0.5, tau=1.0)
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,  # scaled by batch_size / 512
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.025,
            clip_grad=0.02,  # AGC; 0 for none
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
    c.progress = True  # tqdm bar on process 0
    c.lock()
    return c


def digits(runlocal: bool = False) -> ml_collections.ConfigDict:
    """A tiny EfficientViT on scikit-learn's 8x8 digits upscaled to 32 px RGB (``make demo``).

    No crop, flip, RandAugment, erasing or repeats: 8x8 digits are too small for them (flips and
    rotations change the digit). ``runlocal``: a 30-step smoke run.
    """
    c = imagenet_recipe()
    c.img_size = 32
    c.batch_size = 64
    c.eval_batch_size = 120
    c.model.embed_dim = (32, 48, 64)
    c.model.key_dim = (8, 8, 8)
    c.model.depth = (1, 1, 1)
    c.model.num_heads = (2, 2, 2)
    c.model.window_size = (2, 2, 2)
    c.model.kernels = (3, 3)
    c.data.name = "digits"
    c.data.workers = 0
    c.data.aug = "none"
    c.data.device_resize = False  # no crop to resample
    c.data.crop_pct = 1.0  # validation images are already img_size: no resize, no crop
    c.data.randaugment = ""
    c.data.reprob = 0.0
    c.data.repeated_aug = 1
    c.optim.lr = 0.02  # x 64/512 -> 2.5e-3
    c.optim.epochs = 20.0
    c.optim.warmup_epochs = 2.0
    c.optim.cooldown_epochs = 0.0
    c.aug.mixup = 0.0
    c.aug.cutmix = 0.0
    c.ema_decay = 0.99
    c.log_every = 10
    c.eval_every = 110
    c.checkpoint_every = 110
    if runlocal:
        c.total_steps = 30
        c.eval_every = c.checkpoint_every = 30
    return c
