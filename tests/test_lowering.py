"""Accelerator graphs, checked on a CPU-only machine: ``jax.export`` lowers for TPU and CUDA
without the hardware. The lowered modules must be the standard path - depthwise convolutions as
``stablehlo.convolution`` with ``feature_group_count > 1``, no ``optimization_barrier``, no
custom calls (the XLA-CPU kernels use none either, but a CPU-only target must never appear)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import cga_jax
from cga_jax.layers import Conv2d
from cga_jax.training.models import build_model
from cga_jax.training.optim import make_optimizer
from cga_jax.training.randaugment import RandAugment
from cga_jax.training.recipe import imagenet_recipe
from cga_jax.training.schedule import make_schedule
from cga_jax.training.steps import make_train_step
from cga_jax.training.trainer import initial_state

VARIANTS = cga_jax.list_models()


def abstract_model(name: str, **kw) -> nnx.Module:
    """The model with abstract (ShapeDtypeStruct) weights: lowering needs no values."""
    return nnx.eval_shape(lambda: cga_jax.create_model(name, **kw))


def depthwise_count(model: nnx.Module) -> int:
    return sum(
        1 for _, m in nnx.iter_modules(model) if isinstance(m, Conv2d) and m.groups == m.in_chs > 1
    )


def grouped_convs(text: str) -> int:
    """Convolutions with feature_group_count > 1 in a StableHLO module."""
    groups = re.findall(r"stablehlo\.convolution.*?feature_group_count = (\d+)", text)
    return sum(int(g) > 1 for g in groups)


def assert_standard_path(text: str, depthwise: int, per_forward: int = 1) -> None:
    """``text`` lowers every depthwise conv as a grouped convolution (``per_forward`` times each:
    a backward pass adds the transposes), with no barrier and no custom call."""
    assert "optimization_barrier" not in text
    assert re.findall(r"custom_call @?\"?([\w.]+)", text) == []
    assert grouped_convs(text) >= depthwise * per_forward, (grouped_convs(text), depthwise)


def lower(fn, *args, platforms: tuple[str, ...]) -> str:
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def forward_fn(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return (lambda st, x: nnx.merge(graphdef, st)(x)), state


IMAGES = jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32)


@pytest.mark.parametrize("name", VARIANTS)
def test_folded_forward_lowers_for_tpu_and_cuda(name):
    def build():
        model = cga_jax.create_model(name)
        model.eval()
        return cga_jax.fuse_bn(model)

    folded = nnx.eval_shape(build)
    fn, state = forward_fn(folded)
    n = depthwise_count(folded)
    assert n >= 3 * sum(cga_jax.get_config(name).depth)  # 2 per block + 1 per head at least
    for platform in ("tpu", "cuda"):
        text = lower(fn, state, IMAGES, platforms=(platform,))
        assert_standard_path(text, n)
        assert grouped_convs(text) == n  # exactly the model's depthwise convs, nothing else


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientvit_m4"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_unfolded_forward_lowers_for_tpu_and_cuda(name, mode):
    model = abstract_model(name)
    model.eval() if mode == "eval" else model.train()
    graphdef, state = nnx.split(model)

    def fn(st, x):  # train mode: BN statistics are outputs too
        m = nnx.merge(graphdef, st)
        return m(x), nnx.state(m, nnx.BatchStat)

    n = depthwise_count(model)
    for platform in ("tpu", "cuda"):
        text = lower(fn, state, IMAGES, platforms=(platform,))
        assert_standard_path(text, n)
        assert grouped_convs(text) == n


def test_cpu_lowering_keeps_the_cpu_kernels_and_multi_platform_keeps_both():
    """``impl="auto"``: a CPU lowering has the shifted-add depthwise convs (no grouped
    convolution); one export for cpu+cuda+tpu carries both paths; ``impl="standard"`` lowers the
    grouped convolutions for CPU too. (In a GPU/TPU process ``auto`` is the standard path.)"""
    if jax.default_backend() != "cpu":
        pytest.skip("impl='auto' switches per platform only in a CPU process")
    model = abstract_model("efficientvit_m0")
    model.eval()
    fn, state = forward_fn(model)
    n = depthwise_count(model)
    assert grouped_convs(lower(fn, state, IMAGES, platforms=("cpu",))) == 0
    both = lower(fn, state, IMAGES, platforms=("cpu", "cuda", "tpu"))
    assert grouped_convs(both) >= n and "stablehlo.case" in both
    cga_jax.set_impl(model, "standard")
    fn, state = forward_fn(model)
    assert grouped_convs(lower(fn, state, IMAGES, platforms=("cpu",))) == n


def test_multi_platform_serving_artifact_runs_here():
    """One ``export_serving`` artifact for cpu, cuda and tpu; loaded here it runs the CPU path
    and gives the model's logits for any batch size."""
    import numpy as np

    from cga_jax.serving import export_serving, load_serving

    cfg = cga_jax.EfficientViTConfig(
        embed_dim=(16, 24, 32), key_dim=(4, 4, 4), depth=(1, 1, 1), num_heads=(2, 2, 2),
        window_size=(3, 3, 3), kernels=(5, 3), num_classes=7, img_size=64,
    )  # fmt: skip
    model = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))
    model.eval()
    data = export_serving(model, 64, platforms=("cpu", "cuda", "tpu"))
    exp = jax.export.deserialize(bytearray(data))
    assert exp.platforms == ("cpu", "cuda", "tpu")
    assert grouped_convs(exp.mlir_module()) >= depthwise_count(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64, 64, 3)), jnp.float32)
    want = np.asarray(cga_jax.fuse_bn(model)(x))
    np.testing.assert_allclose(np.asarray(load_serving(data)(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="platforms must be a non-empty subset"):
        export_serving(model, 64, platforms=("gpu",))


@pytest.mark.parametrize(
    "name", ["efficientvit_m0", pytest.param("efficientvit_m4", marks=pytest.mark.slow)]
)
def test_training_step_lowers_for_tpu_and_cuda(name):
    """The trainer's whole step as ``train.py`` builds it for the ImageNet recipe - device flip
    and RandAugment, random erasing, mixup/cutmix, label smoothing, forward and backward in
    train-mode BN, AGC + AdamW, EMA - lowers to the standard path for both accelerators."""
    cfg = imagenet_recipe()
    cfg.model.name = name
    cfg.model.impl = "standard"  # what build_model resolves "auto" to in a GPU/TPU process
    cfg.batch_size = 8
    assert cfg.data.device_aug and cfg.data.reprob > 0 and cfg.aug.mixup > 0  # all in the step
    model = build_model(
        cfg.model, img_size=224, num_classes=1000, distillation=False, seed=0, new_head=True
    )
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    schedule = make_schedule(cfg.optim, batch_size=8, steps_per_epoch=100)
    tx = make_optimizer(
        cfg.optim, params=params, schedule=schedule, no_weight_decay=model.no_weight_decay()
    )
    step = make_train_step(
        cfg, graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, num_classes=1000
    )
    state = jax.eval_shape(lambda: initial_state(params, batch_stats, tx, 0))
    layers = RandAugment(cfg.data.randaugment).cfg.num_layers
    b = cfg.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32),
        "valid": jax.ShapeDtypeStruct((b,), jnp.int32),
        "erase": jax.ShapeDtypeStruct((b, 4), jnp.int32),
        "flip": jax.ShapeDtypeStruct((b,), jnp.int32),
        "ra": jax.ShapeDtypeStruct((b, layers, 9), jnp.float32),
    }
    for platform in ("tpu", "cuda"):
        text = lower(step, state, batch, platforms=(platform,))
        assert_standard_path(text, depthwise_count(model), per_forward=2)
