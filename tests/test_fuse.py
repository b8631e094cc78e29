"""BN folding: against the official fusion (fixtures) and against the unfused model."""

from __future__ import annotations

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from utils import assert_logits_close

import cga_jax
from cga_jax.layers import BatchNorm


def _run(model, x):
    return nnx.jit(lambda m, v: m(v))(model, x)


@pytest.mark.parametrize("case", ["official_tiny", "official_m0"])
def test_fused_vs_official_fusion(fixtures_dir, case):
    pytest.importorskip("torch")
    z = np.load(fixtures_dir / f"{case}.npz", allow_pickle=False)
    cfg = cga_jax.EfficientViTConfig(**ast.literal_eval(str(z["config"])))
    model = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))
    cga_jax.loading.load_pretrained(model, fixtures_dir / f"{case}.pth")
    fused = cga_jax.fuse_bn(model)
    x = jnp.asarray(z["input"].transpose(0, 2, 3, 1))
    assert_logits_close(_run(fused, x), z["logits_fused"], f"{case} fused vs official fused")
    model.eval()
    assert_logits_close(_run(fused, x), _run(model, x), f"{case} fused vs unfused")


def randomize(model: nnx.Module, seed: int) -> None:
    """Random weights and BN statistics (no zero-initialised BN weights left)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        leaf = path[-1]
        shape = var.shape
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            new = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "scale":
            new = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            new = rng.normal(0, 0.1, shape)
        elif leaf == "attention_biases":
            new = rng.normal(0, 0.5, shape)
        else:
            continue
        var.set_value(jnp.asarray(new, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))
    # BN running stats: the real statistics on a random batch, then perturbed (eval stays scaled)
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
    for bn in bns:
        bn.momentum = 0.0
    model.train()
    model(jnp.asarray(rng.standard_normal((4, 224, 224, 3)), jnp.float32))
    for bn in bns:
        bn.momentum = 0.9
        std = np.sqrt(np.asarray(bn.var[...]))
        bn.mean[...] = bn.mean[...] + 0.1 * std * rng.standard_normal(std.shape)
        bn.var[...] = bn.var[...] * rng.uniform(0.8, 1.25, std.shape)


@pytest.mark.parametrize(
    "name",
    [
        n if n == "efficientvit_m0" else pytest.param(n, marks=pytest.mark.slow)
        for n in cga_jax.list_models()
    ],
)
def test_fused_equals_unfused(name):
    model = cga_jax.create_model(name, rngs=nnx.Rngs(3))
    randomize(model, 3)
    fused = cga_jax.fuse_bn(model)
    model.eval()
    assert not any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(fused))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32))
    ref = _run(model, x)
    assert float(jnp.abs(ref).max()) > 1.0
    assert_logits_close(_run(fused, x), ref, f"{name} fused vs unfused")
    jax.block_until_ready(ref)
