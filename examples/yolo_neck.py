"""EfficientViT backbone + a YOLO-style P3/P4/P5 neck with C2fCGA blocks, trained on generated data.

    python examples/yolo_neck.py                  # tiny random backbone, 30 steps on CPU
    python examples/yolo_neck.py --steps 100 --img 128
    python examples/yolo_neck.py --backbone efficientvit_m0 --pretrained m0.pth --img 256

The backbone gives maps at strides 8/16/32 (``forward_pyramid``: the stem's stride-8 tap, stages 0
and 1). A PAN-like top-down path fuses them with two ``C2fCGA`` blocks (C2f + cascaded group
attention, residual) and a 1x1 head predicts an objectness map at stride 8. The data are noise
images with bright squares; the target marks the stride-8 cells holding a square's centre.
Prints the loss of every step; it falls.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cga_jax
from cga_jax.layers import Conv2d
from cga_jax.neck import C2fCGA, upsample_to


class TinyDetector(nnx.Module):
    """(B, H, W, 3) -> objectness logits (B, ceil(H/8), ceil(W/8))."""

    def __init__(
        self, backbone: cga_jax.EfficientViT, width: int = 32, window: int = 4, *, rngs: nnx.Rngs
    ):
        self.backbone = backbone
        c3, c4, c5 = (i["num_chs"] for i in backbone.feature_info_with_stem()[:3])
        cga = dict(num_heads=2, key_dim=8, window=window, kernels=3, rngs=rngs)
        self.fuse4 = C2fCGA(c5 + c4, 2 * width, **cga)
        self.fuse3 = C2fCGA(2 * width + c3, width, **cga)
        self.head = Conv2d(width, 1, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        p3, p4, p5 = self.backbone.forward_pyramid(x)
        n4 = self.fuse4(jnp.concatenate([upsample_to(p5, p4), p4], axis=-1))
        n3 = self.fuse3(jnp.concatenate([upsample_to(n4, p3), p3], axis=-1))
        return self.head(n3)[..., 0]


def make_batch(rng: np.random.RandomState, batch: int, img: int, boxes: int = 3):
    """Noise images with ``boxes`` bright squares each; target 1 at the squares' centre cells."""
    x = rng.randn(batch, img, img, 3).astype(np.float32) * 0.5
    g = -(-img // 8)
    y = np.zeros((batch, g, g), np.float32)
    for b in range(batch):
        for _ in range(boxes):
            s = rng.randint(img // 8, img // 3)
            top, left = rng.randint(0, img - s), rng.randint(0, img - s)
            x[b, top : top + s, left : left + s] += rng.uniform(1.5, 3.0, 3)
            y[b, (top + s // 2) // 8, (left + s // 2) // 8] = 1.0
    return jnp.asarray(x), jnp.asarray(y)


def build(backbone: str, pretrained: str | None, img: int, seed: int) -> TinyDetector:
    rngs = nnx.Rngs(seed)
    if backbone == "tiny":
        cfg = cga_jax.EfficientViTConfig(
            embed_dim=(32, 48, 64),
            key_dim=(8, 8, 8),
            depth=(1, 1, 1),
            num_heads=(2, 2, 2),
            kernels=(3, 3),
            img_size=img,
            num_classes=0,
        )
        net = cga_jax.EfficientViT(cfg, rngs=rngs)
    else:
        # the classifier stays (unused) so that an ImageNet checkpoint loads strictly
        net = cga_jax.create_model(backbone, pretrained=pretrained, img_size=img, rngs=rngs)
    return TinyDetector(net, rngs=rngs)


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=64, help="square input side")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--backbone", default="tiny", help="'tiny' or a model name, e.g. efficientvit_m0"
    )
    p.add_argument("--pretrained", default=None, help="checkpoint for a named backbone")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = build(args.backbone, args.pretrained, args.img, args.seed)
    print(f"model built in {time.perf_counter() - t0:.1f}s (step 0 includes jit compilation)")
    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: TinyDetector, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        def loss_fn(m: TinyDetector) -> jax.Array:
            logits = m(x)
            # positives are rare: weight them up so the map is not trivially all-background
            w = 1.0 + 8.0 * y
            return jnp.mean(w * optax.sigmoid_binary_cross_entropy(logits, y)) / jnp.mean(w)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    data = np.random.RandomState(args.seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = make_batch(data, args.batch, args.img)
        loss = float(train_step(model, optimizer, x, y))
        losses.append(loss)
        print(f"step {step:3d}  loss {loss:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    k = max(1, len(losses) // 5)
    print(
        f"mean loss, first {k} steps {np.mean(losses[:k]):.4f} -> last {k} {np.mean(losses[-k:]):.4f}"
    )
    return losses


if __name__ == "__main__":
    main()
