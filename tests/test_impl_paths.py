"""The two implementations of the primitives agree: the standard lax path (what GPUs and TPUs
run) and the XLA-CPU kernels, on the same weights - logits, gradients and BN running statistics,
eval and train mode, for M0 and a mixed-kernel variant (M4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plugin_helpers import randomize_nnx
from utils import assert_grads_close, assert_rel_l2

import cga_jax

BATCH, SIDE = 8, 160  # 160: stage maps 10, 5, 3 - padded windows in stage 1


def _run(model, x, r):
    """Logits, d/d(input, params) of sum(logits * r), and the BN statistics after the pass."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(x, params):
        def loss(x, p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            out = m(x)
            return jnp.sum(out * r), (out, nnx.state(m, nnx.BatchStat))

        (_, (out, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return out, grads, stats

    out, (gx, gp), stats = f(x, params)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(t))}  # noqa: E731,E501  # fmt: skip
    return np.asarray(out), np.asarray(gx), flat(gp), flat(stats)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientvit_m4"])
def test_standard_and_cpu_paths_agree(name, mode):
    model = nnx.eval_shape(lambda: cga_jax.create_model(name, impl="cpu"))
    randomize_nnx(model, seed=11)
    model.eval() if mode == "eval" else model.train()
    other = nnx.merge(*nnx.split(model))
    cga_jax.set_impl(other, "standard")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, 3)), jnp.float32)
    r = jnp.asarray(rng.normal(size=(BATCH, 1000)), jnp.float32)
    cpu = _run(model, x, r)
    std = _run(other, x, r)
    ref = std[0]
    assert np.abs(ref).max() > 1.0  # well scaled, not degenerate
    err = float(np.abs(cpu[0] - ref).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), f"logits differ by {err:.3g}"
    assert_rel_l2(cpu[1], std[1], tol=1e-4, what=f"{name} {mode} d/d input")
    assert_grads_close(cpu[2], std[2], tol=1e-4, what=f"{name} {mode}")
    assert set(cpu[3]) == set(std[3])
    for k in std[3]:
        np.testing.assert_allclose(cpu[3][k], std[3][k], rtol=1e-4, atol=1e-5, err_msg=k)
