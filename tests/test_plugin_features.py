"""Multi-scale features (forward_intermediates, the stride-8 tap) and input-size changes, vs timm."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plugin_helpers import randomize_nnx

import cga_jax
from cga_jax.features import feature_take_indices

torch_ref = pytest.importorskip("torch_ref")  # skips the module when torch/timm are absent
from utils import assert_logits_close  # noqa: E402

torch = torch_ref.torch


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "name,hw",
    [
        ("efficientvit_m0", (224, 224)),
        pytest.param("efficientvit_m4", (192, 256), marks=pytest.mark.slow),
    ],
)
def test_forward_intermediates_matches_timm(name, hw):
    tm, jm = torch_ref.timm_and_cga_pair(name, seed=3)
    x = np.random.RandomState(0).randn(2, *hw, 3).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref_final, ref_maps = tm.forward_intermediates(xt)
        # conv1, relu1, ..., relu3 of timm's PatchEmbedding: the stride-8 map
        ref_stem = torch.nn.Sequential(*list(tm.patch_embed.children())[:6])(xt)
    f = nnx.jit(lambda m, v: m.forward_intermediates(v, include_stem=True))
    final, maps = f(jm, jnp.asarray(x))
    assert len(maps) == 1 + len(ref_maps) == 4
    infos = jm.feature_info_with_stem()
    assert [i["reduction"] for i in infos] == [8, 16, 32, 64]
    assert [i["num_chs"] for i in infos[1:]] == [i["num_chs"] for i in tm.feature_info]
    assert [i["reduction"] for i in infos[1:]] == [i["reduction"] for i in tm.feature_info]
    for info, ours, ref in zip(infos, maps, [ref_stem, *ref_maps], strict=True):
        s = info["reduction"]
        assert ours.shape == (2, -(-hw[0] // s), -(-hw[1] // s), info["num_chs"])
        err = assert_logits_close(ours, _nhwc(ref), f"{name} {info['module']}")
        print(f"{name} {info['module']} /{s}: max|diff| {err:.2e}, max|ref| {ref.abs().max():.2f}")
    assert_logits_close(final, _nhwc(ref_final), f"{name} final")


def test_indices_semantics():
    """int = last n, sequence = those (negative from the end, stage order), as timm; stop_early."""
    from timm.models._features import feature_take_indices as timm_take

    for idx in (None, 1, 2, 3, [0], [-1], [2, 0], [0, -2], (1,)):
        assert feature_take_indices(3, idx) == timm_take(3, idx), idx
    for bad in (0, 4, [3], [-4], []):
        with pytest.raises(ValueError):
            feature_take_indices(3, bad)

    cfg = cga_jax.EfficientViTConfig(
        embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=(2, 2, 2), num_classes=0
    )
    jm = randomize_nnx(nnx.eval_shape(lambda: cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))))
    jm.eval()
    x = jnp.asarray(np.random.RandomState(0).randn(1, 80, 112, 3).astype(np.float32))

    def shapes(**kw):
        out = nnx.eval_shape(lambda m, v: m.forward_intermediates(v, **kw), jm, x)
        final, maps = (None, out) if kw.get("intermediates_only") else out
        return (final.shape if final is not None else None), [m.shape[1:] for m in maps]

    s0, s1, s2 = (5, 7, 16), (3, 4, 24), (2, 2, 32)
    assert shapes() == ((1, *s2), [s0, s1, s2])
    assert shapes(indices=2, intermediates_only=True) == (None, [s1, s2])
    assert shapes(indices=[-1, 0], intermediates_only=True) == (None, [s0, s2])
    assert shapes(indices=[0], stop_early=True) == ((1, *s0), [s0])
    assert shapes(indices=1, include_stem=True) == ((1, *s2), [(10, 14, 8), s2])
    with pytest.raises(ValueError, match="NHWC"):
        jm.forward_intermediates(x, output_fmt="NCHW")

    f = nnx.jit(lambda m, v: (m.forward_intermediates(v), m.forward_pyramid(v)))
    (full_final, full), (p3, p4, p5) = f(jm, x)
    assert [p.shape[1:] for p in (p3, p4, p5)] == [(10, 14, 8), s0, s1]
    np.testing.assert_allclose(p4, full[0], atol=1e-5)
    np.testing.assert_allclose(p5, full[1], atol=1e-5)
    np.testing.assert_allclose(full_final, full[2], atol=1e-5)
    assert float(jnp.abs(full[2]).max()) > 0.1


def test_set_input_size_matches_timm():
    """Loaded at 224, resized to 288 then 160 (each from the current tables, as timm)."""
    tm, jm = torch_ref.timm_and_cga_pair("efficientvit_m0", seed=5)
    assert [s.blocks[0].mixer.m.attn.resolution for s in jm.stages] == [7, 7, 4]
    f = nnx.jit(lambda m, v: m(v))
    for size, windows in ((288, [7, 7, 5]), (160, [7, 5, 3])):
        tm.set_input_size(size)
        jm.set_input_size(size)
        assert [s.blocks[0].mixer.m.attn.resolution for s in jm.stages] == windows
        assert [s.blocks[0].mixer.m.attn.resolution for s in tm.stages] == windows
        assert jm.cfg.img_size == size
        ref_sd = torch_ref.state_dict_np(tm)
        for k, v in cga_jax.keymap.to_timm_state_dict(jm).items():
            if k.endswith("attention_biases"):
                np.testing.assert_allclose(v, ref_sd[k], atol=2e-6, err_msg=k)
        x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
        ref = torch_ref.run_nchw(tm, x)
        err = assert_logits_close(f(jm, jnp.asarray(x)), ref, f"set_input_size({size})")
        print(f"set_input_size({size}): max|diff| {err:.2e}, max|ref| {np.abs(ref).max():.2f}")


@pytest.mark.slow
@pytest.mark.parametrize("size", [288, 160])
def test_create_model_img_size_matches_timm_set_input_size(tmp_path, size):
    """create_model(pretrained=224 checkpoint, img_size=s) == timm at 224 + set_input_size(s)."""
    tm = torch_ref.make_timm("efficientvit_m0", seed=6)
    path = tmp_path / "m0_224.pth"
    torch.save(tm.state_dict(), path)
    tm.set_input_size(size)
    with pytest.warns(UserWarning, match="resized"):
        jm = cga_jax.create_model("efficientvit_m0", pretrained=path, img_size=size)
    jm.eval()
    x = np.random.RandomState(size + 1).randn(2, size, size, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    err = assert_logits_close(nnx.jit(lambda m, v: m(v))(jm, jnp.asarray(x)), ref, f"@{size}")
    print(f"create_model(img_size={size}): max|diff| {err:.2e}")
