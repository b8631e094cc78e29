"""The benchmark's own pieces: BN folding (cga_jax and timm side) and the --only parser."""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from utils import assert_logits_close

import cga_jax
from cga_jax.config import EfficientViTConfig
from cga_jax.layers import BatchNorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is not installed; plain `pytest` does not add the root
    sys.path.insert(0, str(ROOT))

from bench import plan  # noqa: E402
from bench.fold import fold_batchnorm, get_folder  # noqa: E402

TINY = EfficientViTConfig(
    embed_dim=(16, 32, 48),
    key_dim=(8, 8, 8),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    kernels=(5, 3, 3, 3),
    img_size=64,
    num_classes=10,
)


def _randomize(model: nnx.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affines and attention biases (the defaults fold to no-ops)."""
    rng = np.random.RandomState(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BatchNorm):
            c = m.num_features
            m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            m.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
            m.mean[...] = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
            m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
        elif isinstance(m, cga_jax.CascadedGroupAttention):
            shape = m.attention_biases[...].shape
            m.attention_biases[...] = jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)


def test_fold_batchnorm_matches_unfused():
    model = cga_jax.EfficientViT(TINY, rngs=nnx.Rngs(0))
    _randomize(model)
    model.eval()
    x = jnp.asarray(np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32))
    ref = np.asarray(model(x))
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(folded))
    assert any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(model))  # original kept
    assert np.abs(ref).max() > 0.1  # the check is not vacuous
    assert_logits_close(np.asarray(folded(x)), ref, "folded logits")
    jitted = nnx.jit(lambda m, v: m(v))(folded, x)
    assert_logits_close(np.asarray(jitted), ref, "folded logits (jit)")


def test_get_folder_choices():
    name, fn = get_folder("bench")
    assert fn is fold_batchnorm and name.startswith("bench.")
    auto_name, _ = get_folder("auto")
    assert auto_name == ("cga_jax.fuse_bn" if hasattr(cga_jax, "fuse_bn") else name)
    if not hasattr(cga_jax, "fuse_bn"):
        with pytest.raises(RuntimeError):
            get_folder("cga_jax")
    with pytest.raises(ValueError):
        get_folder("nope")


def test_torch_replace_batchnorm_matches_unfused():
    torch_ref = pytest.importorskip("torch_ref")
    from bench.tasks_torch import fused_eval

    torch = torch_ref.torch
    tm = torch_ref.timm_from_config(TINY)
    torch_ref.randomize_(tm, seed=2)
    torch_ref.calibrate_bn_(tm, (64, 64), seed=2)
    x = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    fused = fused_eval(tm)
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in fused.modules()
    )
    assert_logits_close(torch_ref.run_nchw(fused, x), ref, "timm fused logits")


def test_parse_only():
    assert plan.parse_only(None) == plan.DEFAULT_VARIANTS
    assert plan.parse_only(["official:m1+m2"]) == {
        "official": ("efficientvit_m1", "efficientvit_m2")
    }
    assert plan.parse_only(["train,m0"]) == {"train": ("efficientvit_m0",)}
    assert set(plan.parse_only(["m4"])) == set(plan.SECTIONS)
    with pytest.raises(ValueError):
        plan.parse_only(["m9"])
