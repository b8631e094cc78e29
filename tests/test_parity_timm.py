"""cga_jax vs timm (live oracle) with random weights and calibrated, randomised BN statistics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cga_jax
from cga_jax.keymap import to_timm_state_dict

torch_ref = pytest.importorskip("torch_ref")  # skips the module when torch/timm are absent
from utils import assert_logits_close  # noqa: E402

VARIANTS = cga_jax.list_models()


def _forward(model, x):
    return nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_eval_logits_224(name):
    tm, jm = torch_ref.timm_and_cga_pair(name, seed=VARIANTS.index(name))
    x = np.random.RandomState(1).randn(2, 224, 224, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    assert np.abs(ref).max() > 1.0  # well scaled, not degenerate
    assert_logits_close(_forward(jm, x), ref, f"{name} eval logits")


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientvit_m4"])
def test_standard_path_matches_timm(name):
    """The standard path (what GPUs and TPUs run: grouped lax convolutions, jnp reductions),
    forced on this machine: eval logits, then train-mode logits and BN running statistics on a
    batch of 8."""
    tm, jm = torch_ref.timm_and_cga_pair(name, seed=VARIANTS.index(name) + 20)
    cga_jax.set_impl(jm, "standard")
    x = np.random.RandomState(4).randn(8, 224, 224, 3).astype(np.float32)
    assert_logits_close(_forward(jm, x[:2]), torch_ref.run_nchw(tm, x[:2]), f"{name} standard eval")
    tm.train()
    jm.train()
    ref = torch_ref.run_nchw(tm, x)
    assert_logits_close(_forward(jm, x), ref, f"{name} standard train")
    ours = to_timm_state_dict(jm)
    theirs = torch_ref.state_dict_np(tm)
    stats = [k for k in theirs if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50
    for k in stats:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_jit_and_eager_agree():
    """Both paths meet the parity bar against timm, and so agree with each other within it
    (XLA fuses differently under jit, so they are not bitwise equal)."""
    tm, jm = torch_ref.timm_and_cga_pair("efficientvit_m0")
    x = np.random.RandomState(2).randn(1, 224, 224, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    eager = np.asarray(jm(jnp.asarray(x)))
    jitted = np.asarray(_forward(jm, x))
    assert_logits_close(eager, ref, "eager")
    assert_logits_close(jitted, ref, "jit")
    assert_logits_close(jitted, eager, "jit vs eager")


@pytest.mark.parametrize(
    "name,img_size,input_hw",
    [
        ("efficientvit_m0", 256, (256, 256)),
        ("efficientvit_m2", 160, (160, 160)),
        ("efficientvit_m0", 224, (224, 288)),
        ("efficientvit_m1", 224, (200, 168)),
        ("efficientvit_m4", 224, (96, 130)),  # maps smaller than the window in stages 2-3
    ],
)
def test_other_sizes(name, img_size, input_hw):
    tm, jm = torch_ref.timm_and_cga_pair(name, img_size=img_size)
    x = np.random.RandomState(3).randn(2, *input_hw, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    assert_logits_close(_forward(jm, x), ref, f"{name}@{img_size} on {input_hw}")


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count(name):
    tm = torch_ref.timm.create_model(name, pretrained=False)
    ref = sum(p.numel() for p in tm.parameters())
    jm = nnx.eval_shape(lambda: cga_jax.create_model(name))
    ours = sum(
        int(np.prod(p.shape)) for p in __import__("jax").tree.leaves(nnx.state(jm, nnx.Param))
    )
    assert ours == ref


def test_state_dict_roundtrip_keys():
    """Every timm state-dict entry maps onto a cga_jax leaf and back to the same key and array."""
    tm, jm = torch_ref.timm_and_cga_pair("efficientvit_m1")
    ref = {
        k: v
        for k, v in torch_ref.state_dict_np(tm).items()
        if not k.endswith("num_batches_tracked")
    }
    back = cga_jax.keymap.to_timm_state_dict(jm)
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
