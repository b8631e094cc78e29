"""Fine-tune converted weights on your own folder dataset (new classifier head).

    python train.py --config configs/finetune.py:m0 --workdir /ckpt/ft \
        --config.model.pretrained=efficientvit_m0.pth --config.data.root=/data/mydata

``root/train/<class>/*`` and ``root/val/<class>/*``; the classifier has one output per class
folder (``model.num_classes`` None). The authors' advice for downstream classification: AdamW,
lr 1e-3, weight decay 1e-8, batch 256, otherwise the ImageNet recipe (augmentation included; the
official ``main.py`` refuses distillation with ``--finetune``, and the recipe has none).
"""

from __future__ import annotations

import ml_collections

from cga_jax.training.recipe import imagenet_recipe


def get_config(arg: str = "m0") -> ml_collections.ConfigDict:
    c = imagenet_recipe()
    c.model.name = f"efficientvit_{arg}"
    c.batch_size = 256
    c.eval_batch_size = 256
    c.optim.lr = 1e-3 * 512 / 256  # so that lr * batch / 512 == 1e-3
    c.optim.weight_decay = 1e-8
    c.optim.epochs = 100.0
    c.eval_every = 500
    return c
