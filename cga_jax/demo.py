"""`make demo`: load official-format weights, convert, predict (a smoke run of the whole path).

Uses ../shared/fixtures/official_m0.pth when present (the official EfficientViT-M0 with random
weights), otherwise writes an official-format checkpoint of a random model first.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cga_jax


def main() -> None:
    fixture = pathlib.Path(__file__).resolve().parents[2] / "shared/fixtures/official_m0.pth"
    with tempfile.TemporaryDirectory() as tmp:
        if fixture.exists():
            ckpt = fixture
        else:
            import torch

            from cga_jax.weights import timm_to_official, to_timm_state_dict

            src = cga_jax.create_model("efficientvit_m0", rngs=nnx.Rngs(1))
            sd = timm_to_official(to_timm_state_dict(src))
            ckpt = pathlib.Path(tmp) / "efficientvit_m0.pth"
            torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, ckpt)
        t0 = time.perf_counter()
        model = cga_jax.create_model("efficientvit_m0", pretrained=ckpt)
        print(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s")
    model.eval()
    x = jnp.asarray(np.random.RandomState(0).randn(4, 224, 224, 3).astype(np.float32))
    forward = nnx.jit(lambda m, v: m(v))
    t0 = time.perf_counter()
    logits = jax.block_until_ready(forward(model, x))
    print(f"compiled + ran in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}")
    t0 = time.perf_counter()
    jax.block_until_ready(forward(model, x))
    print(f"batch of 4 at 224x224: {1000 * (time.perf_counter() - t0):.0f} ms")
    print("top-5 classes per image:", np.argsort(-np.asarray(logits), axis=-1)[:, :5].tolist())


if __name__ == "__main__":
    main()
