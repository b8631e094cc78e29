"""Unit tests of the training recipe against its definitions (timm / official Cream code)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import TINY_MODEL, tiny_digits_config

from cga_jax import EfficientViT, EfficientViTConfig
from cga_jax.training.mixup import mix_batch, smooth_one_hot, soft_cross_entropy
from cga_jax.training.models import build_model
from cga_jax.training.optim import (
    adaptive_grad_clip,
    decay_mask,
    ema_init,
    ema_update,
    leaf_name,
    make_optimizer,
)
from cga_jax.training.recipe import digits
from cga_jax.training.schedule import cosine_with_warmup, lr_for_batch, make_schedule

TINY = EfficientViTConfig(img_size=32, num_classes=10, **TINY_MODEL)


def tiny_params():
    return nnx.state(EfficientViT(TINY, rngs=nnx.Rngs(0)), nnx.Param)


# ---- schedule ------------------------------------------------------------------------------
def timm_cosine(t, base, epochs, warm, warm_lr, min_lr):
    """timm CosineLRScheduler(t_initial=epochs, warmup_t=warm, warmup_prefix=False, cycle 1)."""
    if t < warm:
        return warm_lr + t * (base - warm_lr) / warm
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_official_lr_scaling():
    assert lr_for_batch(1e-3, 2048) == pytest.approx(4e-3)


@pytest.mark.parametrize("epoch", [0, 0.5, 2, 4.99, 5, 5.0 + 1 / 100, 150, 299, 300, 305, 309.9])
def test_schedule_matches_timm(epoch):
    spe = 100
    base = lr_for_batch(1e-3, 2048)
    s = cosine_with_warmup(base, spe, 300, 5, 1e-6, 1e-5)
    step = int(round(epoch * spe))
    want = timm_cosine(step / spe, base, 300, 5, 1e-6, 1e-5)
    assert float(s(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_schedule_landmarks():
    s = cosine_with_warmup(4e-3, 10, 300, 5, 1e-6, 1e-5)
    assert float(s(0)) == pytest.approx(1e-6)  # warm-up start
    assert float(s(50)) == pytest.approx(4e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 300)), rel=1e-3)
    assert float(s(25)) == pytest.approx((1e-6 + 4e-3) / 2, rel=1e-4)  # middle of the warm-up
    assert float(s(1500)) == pytest.approx(1e-5 + 0.5 * (4e-3 - 1e-5), rel=1e-4)  # half-way
    assert float(s(3000)) == pytest.approx(1e-5)  # cool-down at min lr
    assert float(s(3099)) == pytest.approx(1e-5)


# ---- AGC -----------------------------------------------------------------------------------
def timm_agc(param_t, grad_t, clip, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad on one torch-layout tensor (numpy)."""

    def unitwise(x):
        if x.ndim <= 1:
            return np.sqrt((x**2).sum())
        return np.sqrt((x**2).sum(axis=tuple(range(1, x.ndim)), keepdims=True))

    max_norm = np.maximum(unitwise(param_t), eps) * clip
    g_norm = unitwise(grad_t)
    clipped = grad_t * (max_norm / np.maximum(g_norm, 1e-6))
    return np.where(g_norm < max_norm, grad_t, clipped)


def to_torch_layout(name, x):
    if name == "kernel" and x.ndim == 4:
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if name == "kernel" and x.ndim == 2:
        return x.T  # (in, out) -> (out, in)
    return x  # attention_biases (heads, points), vectors


def test_agc_matches_timm_definition():
    params = tiny_params()
    rng = np.random.RandomState(0)
    # some units large and some small so that both branches of the clip are taken
    unit = {0: 0.001, 1: 10.0}
    grads = jax.tree.map(
        lambda p: (
            rng.randn(*p.shape).astype(np.float32)
            * np.array([unit[i % 2] for i in range(p.shape[-1])], np.float32)
        ),
        params,
    )
    tx = adaptive_grad_clip(0.02)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    leaves_p = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves_g = jax.tree.leaves(grads)
    leaves_o = jax.tree.leaves(out)
    n_clipped = n_kept = 0
    seen_ab = False
    for (path, p), g, o in zip(leaves_p, leaves_g, leaves_o, strict=True):
        name = leaf_name(path)
        seen_ab |= name == "attention_biases"
        want = timm_agc(
            to_torch_layout(name, np.asarray(p)), to_torch_layout(name, np.asarray(g)), 0.02
        )
        got = to_torch_layout(name, np.asarray(o))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8, err_msg=str(path))
        n_clipped += int(np.sum(~np.isclose(got, to_torch_layout(name, np.asarray(g)))))
        n_kept += int(np.sum(np.isclose(got, to_torch_layout(name, np.asarray(g)))))
    assert seen_ab and n_clipped > 0 and n_kept > 0


def test_plain_optax_agc_differs_on_attention_biases():
    """Why the wrapper exists: optax's unit axis is the last one, timm's head axis is the first."""
    p = jnp.asarray(np.random.RandomState(1).randn(2, 16).astype(np.float32))
    g = jnp.asarray(np.random.RandomState(2).randn(2, 16).astype(np.float32))
    plain, _ = optax.adaptive_grad_clip(0.02).update(g, None, p)
    assert not np.allclose(np.asarray(plain), timm_agc(np.asarray(p), np.asarray(g), 0.02))


# ---- weight decay mask -------------------------------------------------------------------------
def test_weight_decay_mask():
    params = tiny_params()
    mask = decay_mask(params, EfficientViT(TINY, rngs=nnx.Rngs(0)).no_weight_decay())
    by_name: dict[str, set] = {}
    for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
        by_name.setdefault(leaf_name(path), set()).add(bool(m))
    assert by_name == {
        "kernel": {True},  # convolutions and linear layers (head included)
        "bias": {False},
        "scale": {False},  # BN
        "attention_biases": {False},
    }


def test_adamw_decays_only_masked_leaves():
    optim = digits().optim
    optim.weight_decay, optim.clip_grad = 0.5, 0.0
    params = jax.tree.map(lambda x: np.asarray(x) + 1.0, tiny_params())
    tx = make_optimizer(
        optim, params=params, schedule=lambda _: 0.1, no_weight_decay=("attention_biases",)
    )
    zeros = jax.tree.map(np.zeros_like, params)
    upd, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for (path, u), p in zip(
        jax.tree_util.tree_flatten_with_path(upd)[0], jax.tree.leaves(params), strict=True
    ):
        decayed = leaf_name(path) == "kernel"
        want = -0.1 * 0.5 * np.asarray(p) if decayed else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=str(path))


# ---- EMA -----------------------------------------------------------------------------------
def test_ema_update():
    a = {"w": jnp.array([1.0, 2.0]), "s": jnp.array([4.0])}
    st = ema_init(a)
    np.testing.assert_array_equal(st.ema["w"], a["w"])  # starts from the model, not zeros
    b = {"w": jnp.array([3.0, -2.0]), "s": jnp.array([0.0])}
    st = ema_update(0.9, b, st)
    np.testing.assert_allclose(st.ema["w"], 0.9 * a["w"] + 0.1 * b["w"], rtol=1e-6)
    np.testing.assert_allclose(st.ema["s"], [3.6], rtol=1e-6)
    st = ema_update(0.9, b, st)
    np.testing.assert_allclose(st.ema["s"], [3.24], rtol=1e-6)


# ---- label smoothing, mixup, cutmix ------------------------------------------------------------
def test_label_smoothing():
    t = np.asarray(smooth_one_hot(jnp.array([2, 0]), 5, 0.1))
    np.testing.assert_allclose(t[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    logits = jnp.array([[0.0, 1.0, 3.0, 0.0, -1.0]])
    ls = jax.nn.log_softmax(logits)[0]
    want = -(0.92 * ls[2] + 0.02 * (ls.sum() - ls[2]))
    assert float(soft_cross_entropy(logits, t[:1])[0]) == pytest.approx(float(want), rel=1e-6)


def _mix(seed, mixup, cutmix, switch=0.5):
    b, h, w, k = 6, 16, 16, 6
    x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
    labels = jnp.arange(b)
    t = smooth_one_hot(labels, k, 0.0)
    xm, tm = mix_batch(jax.random.key(seed), x, t, mixup, cutmix, switch)
    return np.asarray(x), np.asarray(xm), np.asarray(tm)


def test_mixup_label_mixing():
    x, xm, tm = _mix(0, 0.8, 0.0)
    lam = tm[0, 0]
    assert 0 < lam < 1
    # sample i mixed with sample B-1-i; image and target share the same lam
    for i in range(6):
        np.testing.assert_allclose(xm[i], lam * x[i] + (1 - lam) * x[5 - i], rtol=1e-5)
        assert tm[i, i] == pytest.approx(lam + (1 - lam) * (i == 5 - i), rel=1e-5)
        assert tm[i, 5 - i] == pytest.approx((1 - lam) + lam * (i == 5 - i), rel=1e-5)
    np.testing.assert_allclose(tm.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_label_mixing_is_area_corrected():
    for seed in range(5):
        x, xm, tm = _mix(seed, 0.0, 1.0)
        pasted = (xm[0, :, :, 0] == x[5, 0, 0, 0]).mean()  # fraction of sample 0 from sample 5
        assert tm[0, 0] == pytest.approx(1 - pasted, abs=1e-6)
        assert tm[0, 5] == pytest.approx(pasted, abs=1e-6)
        assert set(np.unique(xm[0])) <= {0.0, 5.0}  # pixels are copied, not blended


def test_switch_prob_uses_both():
    kinds = set()
    for seed in range(30):
        x, xm, _ = _mix(seed, 0.8, 1.0)
        kinds.add("cutmix" if set(np.unique(xm[0])) <= {0.0, 5.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}


# ---- the schedule against timm's scheduler stepped as the official loop steps it ------------------
@pytest.mark.torch
def test_schedule_relation_to_the_official_per_epoch_loop():
    """What cga_jax/training/schedule.py states: timm's per-update mode gives this schedule's
    values; the official loop (``lr_scheduler.step(epoch)`` after each epoch) runs epoch E at the
    value used here at the first update of epoch max(E - 1, 0)."""
    torch = pytest.importorskip("torch")
    from timm.scheduler.cosine_lr import CosineLRScheduler

    spe, epochs, warm, base, warm_lr, min_lr = 5, 12, 3, 4e-3, 1e-6, 1e-5
    ours = cosine_with_warmup(base, spe, epochs, warm, warm_lr, min_lr)

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)

    kw = dict(lr_min=min_lr, warmup_lr_init=warm_lr)
    opt = optimizer()  # the official loop: timm per-epoch, step(epoch) after the epoch
    sched = CosineLRScheduler(opt, t_initial=epochs, warmup_t=warm, **kw)
    for epoch in range(epochs):
        for k in range(spe):
            want = float(ours(max(epoch - 1, 0) * spe))
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-5), (epoch, k)
        sched.step(epoch)
    # ... so within an epoch E >= 1 this schedule is ahead by 1 to 2 epochs
    assert (
        float(ours(6 * spe))
        < float(ours(5 * spe))
        == pytest.approx(
            CosineLRScheduler(optimizer(), t_initial=epochs, warmup_t=warm, **kw)._get_lr(5)[0]
        )
    )
    opt = optimizer()  # timm per-update (--sched-on-updates): step_update after every update
    sched = CosineLRScheduler(
        opt, t_initial=epochs * spe, warmup_t=warm * spe, t_in_epochs=False, **kw
    )
    for step in range(epochs * spe + spe):
        assert opt.param_groups[0]["lr"] == pytest.approx(float(ours(step)), rel=1e-5), step
        sched.step_update(step + 1)


# ---- the trainer's optimizer takes the decay mask from the model ---------------------------------
@pytest.mark.parametrize("no_decay", [("attention_biases",), ()])
def test_weight_decay_follows_the_models_no_weight_decay(monkeypatch, no_decay):
    from jax.sharding import AxisType

    from cga_jax.training.trainer import setup

    monkeypatch.setattr(EfficientViT, "no_weight_decay", lambda self: no_decay)
    cfg = tiny_digits_config(**{"optim.weight_decay": 0.5, "optim.clip_grad": 0.0})
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    program, state = setup(cfg, num_classes=10, steps_per_epoch=10, mesh=mesh)
    params = jax.tree.map(lambda x: np.asarray(x) + 1.0, state["params"])
    zeros = jax.tree.map(np.zeros_like, params)
    upd, _ = jax.jit(program.tx.update)(zeros, program.tx.init(params), params)
    decayed = {
        leaf_name(path)
        for path, u in jax.tree_util.tree_flatten_with_path(upd)[0]
        if np.any(np.asarray(u) != 0)
    }
    assert decayed == {"kernel"} | ({"attention_biases"} - set(no_decay))


def test_make_schedule_scales_the_lr_with_the_batch():
    optim = digits().optim
    s = make_schedule(optim, batch_size=1024, steps_per_epoch=10)
    t = optim.warmup_epochs * 10
    assert float(s(int(t))) == pytest.approx(
        optim.min_lr
        + 0.5 * (optim.lr * 2 - optim.min_lr) * (1 + math.cos(math.pi * 2 / optim.epochs)),
        rel=1e-5,
    )


def test_one_normalize_for_training_and_eval():
    """The train and eval steps normalise with cga_jax.preprocess.normalize (what `cga-jax eval`
    and predict use): torchvision's ToTensor + Normalize, in float32."""
    from cga_jax import evaluate, predict, preprocess
    from cga_jax.training import steps

    assert steps.normalize is preprocess.normalize is evaluate.normalize is predict.normalize
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    mean = np.float32([0.485, 0.456, 0.406])
    std = np.float32([0.229, 0.224, 0.225])
    want = (x.astype(np.float32) / np.float32(255) - mean) / std
    np.testing.assert_array_equal(preprocess.normalize(x), want)  # numpy: exact
    # under jit XLA may turn the divisions into multiplications: within an ulp or so
    got = np.asarray(jax.jit(preprocess.normalize)(x))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", [None, "auto", "standard", "cpu"])
def test_build_model_resolves_auto_for_this_backend(impl):
    """The trainer compiles for one platform: "auto" (the default) becomes this backend's
    implementation; an explicit choice is kept."""
    spec = digits().model
    spec.impl = impl
    model = build_model(
        spec, img_size=32, num_classes=10, distillation=False, seed=0, new_head=True
    )
    here = "cpu" if jax.default_backend() == "cpu" else "standard"
    want = here if impl in (None, "auto") else impl
    assert {m.impl for _, m in nnx.iter_modules(model) if hasattr(m, "impl")} == {want}
