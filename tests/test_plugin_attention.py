"""CGA / LocalWindowAttention as stand-alone layers on maps of any shape (issue: plug-in use).

References: timm's own ``LocalWindowAttention`` / ``CascadedGroupAttention`` modules with the same
(random) weights, and the layer inside a cga_jax ``EfficientViT``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plugin_helpers import randomize_nnx

import cga_jax
from cga_jax.attention import CascadedGroupAttention, LocalWindowAttention, apply_in_windows
from cga_jax.config import head_kernels
from cga_jax.loading import load_timm_state_dict
from cga_jax.resize import resize_attention_biases


# ---------------------------------------------------------------------------------------------
# no torch needed
# ---------------------------------------------------------------------------------------------
def _eval(module: nnx.Module) -> nnx.Module:
    module.eval()
    return module


def test_standalone_equals_model_internal_layer():
    """The same weights give the same outputs inside the model and stand-alone, on odd shapes."""
    cfg = cga_jax.EfficientViTConfig(
        embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 3, 4), num_classes=0
    )
    # abstract init (fast), then every parameter and statistic is set by _randomize
    model = nnx.eval_shape(lambda: cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0)))
    randomize_nnx(model, seed=1)
    model.eval()
    internal = model.stages[2].blocks[0].mixer.m  # dim 64, 4 heads, window min(7, 224/64=4) = 4
    assert internal.attn.resolution == 4
    alone = LocalWindowAttention(64, 16, 4, window_resolution=4, kernels=5, rngs=nnx.Rngs(3))
    nnx.update(alone, nnx.state(internal))
    alone.eval()
    cga = CascadedGroupAttention(64, 16, 4, resolution=4, kernels=(5, 5, 5, 5), rngs=nnx.Rngs(4))
    nnx.update(cga, nnx.state(internal.attn))
    cga.eval()
    f = nnx.jit(lambda a, b, v: (a(v), b(v)))
    rng = np.random.RandomState(0)
    for h, w in [(4, 4), (5, 9), (3, 2), (11, 8)]:
        x = jnp.asarray(rng.randn(2, h, w, 64).astype(np.float32))
        ref, y_alone = (np.asarray(t) for t in f(internal, alone, x))
        assert ref.shape == (2, h, w, 64)
        assert np.abs(ref).max() > 0.1  # not a degenerate (zero-scale BN) layer
        np.testing.assert_allclose(y_alone, ref, rtol=0, atol=1e-6, err_msg=f"LWA {h}x{w}")
        if (h, w) == (4, 4):  # one window: the bare CGA is the layer
            y_cga = np.asarray(nnx.jit(lambda c, v: c(v))(cga, x))
            np.testing.assert_allclose(y_cga, ref, rtol=0, atol=1e-6, err_msg="CGA")
        else:  # CGA attends exactly one window, like timm's
            with pytest.raises(ValueError, match="use LocalWindowAttention"):
                cga(x)


def test_snippet_defaults_run_at_any_size():
    """The widely copied snippet's defaults (8 heads, 4 kernel sizes, resolution 14) crash there;
    here an int kernel is broadcast, CGA attends its 14x14 window and LocalWindowAttention with
    the same settings runs at any map size, jitted too."""
    layer = _eval(CascadedGroupAttention(64, 16, num_heads=8, kernels=5, rngs=nnx.Rngs(0)))
    assert layer.kernels == (5,) * 8
    assert layer.attention_biases.shape == (8, 14 * 14)  # follows the window, not the map
    f = nnx.jit(lambda m, v: m(v))
    assert f(layer, jnp.ones((1, 14, 14, 64))).shape == (1, 14, 14, 64)
    with pytest.raises(ValueError, match="attends one 14x14 window, got a 20x20 map"):
        layer(jnp.ones((1, 20, 20, 64)))
    lwa = _eval(LocalWindowAttention(64, 16, 8, window_resolution=14, kernels=5, rngs=nnx.Rngs(0)))
    for h, w in [(14, 14), (20, 20), (40, 40), (9, 31)]:
        y = f(lwa, jnp.ones((1, h, w, 64)))
        assert y.shape == (1, h, w, 64)
        assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=100, num_heads=8), "cannot be split into num_heads=8"),
        (dict(dim=64, num_heads=8, kernels=(5, 5, 5, 5)), "4 sizes for 8 heads"),
        (dict(dim=64, num_heads=4, kernels=(5, 4, 5, 5)), "odd positive"),
        (dict(dim=64, num_heads=4, attn_ratio=4), "must equal dim/num_heads=16"),
    ],
)
def test_bad_arguments_raise_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadedGroupAttention(key_dim=16, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match=match):
        LocalWindowAttention(key_dim=16, rngs=nnx.Rngs(0), **kwargs)


def test_wrong_channels_and_rank_raise():
    layer = LocalWindowAttention(64, 16, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim=64 channels but got 32"):
        layer(jnp.zeros((1, 8, 8, 32)))
    with pytest.raises(ValueError, match="NHWC"):
        layer(jnp.zeros((8, 8, 64)))


def test_head_kernels():
    assert head_kernels(3, 4) == (3, 3, 3, 3)
    assert head_kernels([7], 3) == (7, 7, 7)
    assert head_kernels((7, 5, 3, 3), 2) == (7, 5)
    # the config validates with the same function, per stage
    with pytest.raises(ValueError, match=r"stage 0 \(4 heads\): kernels=\(7, 5\) gives 2 sizes"):
        cga_jax.EfficientViTConfig(num_heads=(4, 4, 4), kernels=(7, 5))


def test_window_partition_is_exact_tiling():
    """apply_in_windows with a per-window function sees each window once, in place."""
    x = jnp.arange(2 * 10 * 13 * 3, dtype=jnp.float32).reshape(2, 10, 13, 3)
    np.testing.assert_array_equal(np.asarray(apply_in_windows(lambda t: t, x, 4)), np.asarray(x))
    # per-window mean, broadcast back: windows are contiguous 4x4 tiles of the zero-padded map
    y = apply_in_windows(lambda t: jnp.broadcast_to(t.mean((1, 2), keepdims=True), t.shape), x, 4)
    xp = np.pad(np.asarray(x), ((0, 0), (0, 2), (0, 3), (0, 0)))
    tile = xp[:, 4:8, 8:12].mean((1, 2))
    np.testing.assert_allclose(np.asarray(y)[:, 5, 9], tile, rtol=1e-6)


def test_layer_trains_under_grad():
    layer = LocalWindowAttention(16, 8, 2, window_resolution=3, kernels=(3, 5), rngs=nnx.Rngs(0))
    randomize_nnx(layer)  # the output conv's BN scale starts at 0, which would hide the rest
    x = jnp.asarray(np.random.RandomState(0).randn(2, 4, 5, 16).astype(np.float32))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(layer)
    assert grads["attn"]["attention_biases"][...].shape == (2, 9)
    assert float(jnp.abs(grads["attn"]["attention_biases"][...]).max()) > 0
    assert float(jnp.abs(grads["attn"]["qkvs"][0]["conv"]["kernel"][...]).max()) > 0


# ---------------------------------------------------------------------------------------------
# against timm's modules
# ---------------------------------------------------------------------------------------------
def _timm_pair(dim, key_dim, heads, window, kernels, resolution, seed=0):
    torch_ref = pytest.importorskip("torch_ref")
    torch = torch_ref.torch
    from timm.models.efficientvit_msra import LocalWindowAttention as TimmLWA

    tm = TimmLWA(
        dim,
        key_dim,
        heads,
        attn_ratio=dim / heads / key_dim,
        resolution=resolution,
        window_resolution=window,
        kernels=list(kernels),
    )
    torch_ref.randomize_(tm, seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    tm.eval()
    jm = LocalWindowAttention(
        dim,
        key_dim,
        heads,
        resolution=resolution,
        window_resolution=window,
        kernels=kernels,
        rngs=nnx.Rngs(0),
    )
    load_timm_state_dict(jm, torch_ref.state_dict_np(tm), source="timm LWA")
    jm.eval()
    return torch_ref, tm, jm


@pytest.mark.parametrize(
    "dim,key_dim,heads,window,kernels",
    [
        (64, 16, 4, 7, (5, 5, 5, 5)),
        pytest.param(96, 8, 3, 5, (7, 5, 3), marks=pytest.mark.slow),
        pytest.param(48, 12, 6, 4, (3,) * 6, marks=pytest.mark.slow),
    ],
)
def test_standalone_matches_timm_modules(dim, key_dim, heads, window, kernels):
    torch_ref, tm, jm = _timm_pair(dim, key_dim, heads, window, kernels, resolution=64)
    cga = CascadedGroupAttention(
        dim, key_dim, heads, resolution=window, kernels=kernels, rngs=nnx.Rngs(1)
    )
    nnx.update(cga, nnx.state(jm.attn))
    cga.eval()
    from utils import assert_logits_close

    rng = np.random.RandomState(1)
    for h, w in [(window, window), (5, 9), (3, 4), (15, 22), (1, 1), (window - 1, 2 * window + 1)]:
        x = rng.randn(2, h, w, dim).astype(np.float32)
        ref = torch_ref.run_nchw(tm, x).transpose(0, 2, 3, 1)
        assert np.abs(ref).max() > 0.5
        y_lwa = jm(jnp.asarray(x))
        assert_logits_close(np.asarray(y_lwa), ref, f"LWA {h}x{w}")
        if (h, w) == (window, window):  # CGA (timm's too) attends exactly one window
            ref_cga = torch_ref.run_nchw(tm.attn, x).transpose(0, 2, 3, 1)
            assert_logits_close(np.asarray(cga(jnp.asarray(x))), ref_cga, "bare CGA window")


@pytest.mark.parametrize("s1,s2", [(7, 5), (4, 5), (4, 3), (7, 14), (5, 7), (3, 1)])
def test_bias_resize_equals_timm(s1, s2):
    torch_ref = pytest.importorskip("torch_ref")
    torch = torch_ref.torch
    from timm.layers import resize_rel_pos_bias_table_levit

    table = np.random.RandomState(s1 * 10 + s2).randn(4, s1 * s1).astype(np.float32)
    ref = resize_rel_pos_bias_table_levit(torch.from_numpy(table).T, (s2 * s2, 4)).T.numpy()
    ours = resize_attention_biases(table, s2 * s2)
    assert ours.shape == (4, s2 * s2)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_set_resolution_matches_timm():
    """LocalWindowAttention.set_input_size == timm's, incl. the resized table's outputs."""
    torch_ref, tm, jm = _timm_pair(64, 16, 4, 7, (5, 5, 5, 5), resolution=4)
    assert jm.attn.resolution == 4 and jm.attn.attention_biases.shape == (4, 16)
    from utils import assert_logits_close

    for res in (5, 3, 9):
        tm.set_input_size(res)
        jm.set_input_size(res)
        assert jm.attn.resolution == tm.attn.resolution == min(7, res)
        np.testing.assert_allclose(
            np.asarray(jm.attn.attention_biases[...]),
            tm.attn.attention_biases.detach().numpy(),
            atol=2e-6,
        )
        x = np.random.RandomState(res).randn(1, 2 * res + 1, res, 64).astype(np.float32)
        ref = torch_ref.run_nchw(tm, x).transpose(0, 2, 3, 1)
        assert_logits_close(np.asarray(jm(jnp.asarray(x))), ref, f"after set_input_size({res})")
