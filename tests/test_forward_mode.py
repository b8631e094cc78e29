"""Forward-mode AD through the whole model, in both implementations (standard lax ops and the
XLA-CPU kernels) and both BN modes: ``jax.jvp``, ``jax.linearize``, ``jax.jacfwd`` and a
forward-over-reverse Hessian-vector product of the training loss, each checked against reverse
mode or finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from plugin_helpers import calibrate_bn, randomize_nnx

import cga_jax

# "tiny": M0 with one block per stage and narrow stages - every layer kind (RGB stem, depthwise
# and 1x1 convs, BN, windowed cascaded attention, SE, subsample attention, head) at a fraction
# of the compile time of second-order graphs of the full model, which run in the slow suite.
TINY = dict(depth=(1, 1, 1), embed_dim=(16, 32, 48), key_dim=(4, 4, 4), num_heads=(2, 2, 2))
# default run: the CPU kernels' rules in the whole model (BN's training-mode rule, and every
# primitive's jvp and HVP on its own, are in tests/test_ops.py); the rest: slow suite
DEFAULT = {("tiny", "cpu", "eval")}
CASES = [
    pytest.param(n, i, m, marks=[] if (n, i, m) in DEFAULT else [pytest.mark.slow])
    for n in ("tiny", "efficientvit_m0", "efficientvit_m4")
    for i in ("standard", "cpu")
    for m in ("eval", "train")
]
BATCH, SIDE, CLASSES = 8, 32, 10  # train-mode BN is well conditioned from a batch of 8


def build(name: str, impl: str, mode: str):
    """(graphdef, params, rest) of a model with random, well-scaled weights and statistics."""
    over = TINY if name == "tiny" else {}
    name = "efficientvit_m0" if name == "tiny" else name
    model = nnx.eval_shape(
        lambda: cga_jax.create_model(name, num_classes=CLASSES, impl=impl, **over)
    )
    randomize_nnx(model, seed=3)
    x = np.random.default_rng(2).normal(size=(BATCH, SIDE, SIDE, 3))
    calibrate_bn(model, jnp.asarray(x, jnp.float32))
    model.eval() if mode == "eval" else model.train()
    return nnx.split(model, nnx.Param, ...)


def random_like(tree, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, a.dtype), tree)


def vdot(a, b) -> float:
    """Sum of the leaves' inner products."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(float(jnp.vdot(x, y)) for x, y in pairs)


@pytest.mark.parametrize("name,impl,mode", CASES)
def test_jvp_linearize_and_jacfwd_agree_with_reverse_mode(name, impl, mode):
    """The logits as a function of K coordinates that move the image and every weight along
    fixed random directions: ``jacfwd`` (batched JVPs), ``linearize`` applied to the unit
    vectors and ``jvp`` must give the same Jacobian, whose transpose must equal reverse mode."""
    graphdef, params, rest = build(name, impl, mode)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, 3)), jnp.float32)
    k = 3
    dx = [random_like(x, 10 + i) for i in range(k)]
    dp = [random_like(params, 20 + i, 0.01) for i in range(k)]
    w = jnp.asarray(rng.normal(size=(BATCH, CLASSES)), jnp.float32)

    def logits(u):
        xu = x + sum(u[i] * dx[i] for i in range(k))
        pu = jax.tree.map(lambda a, *d: a + sum(u[i] * d[i] for i in range(k)), params, *dp)
        return nnx.merge(graphdef, pu, rest, copy=True)(xu)

    @jax.jit
    def derivatives(u):
        jac = jax.jacfwd(logits)(u)  # (B, classes, K)
        _, lin = jax.linearize(logits, u)
        cols = jnp.stack([lin(e) for e in jnp.eye(k)], axis=-1)
        _, tangent = jax.jvp(logits, (u,), (jnp.ones(k),))
        grad_w = jax.grad(lambda v: jnp.vdot(logits(v), w))(u)  # J^T w, reverse mode
        return jac, cols, tangent, grad_w

    jac, cols, tangent, grad_w = derivatives(jnp.zeros(k, jnp.float32))
    scale = float(jnp.abs(jac).max())
    assert jac.shape == (BATCH, CLASSES, k) and scale > 1e-2  # not degenerate
    np.testing.assert_allclose(np.asarray(cols), np.asarray(jac), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(
        np.asarray(tangent), np.asarray(jac.sum(-1)), rtol=0, atol=1e-5 * scale
    )
    jtw = np.einsum("bck,bc->k", np.asarray(jac, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(grad_w), jtw, rtol=1e-4, atol=1e-4 * np.abs(jtw).max())


@pytest.mark.slow  # the default run checks the HVP of each primitive in tests/test_ops.py
@pytest.mark.parametrize("name,impl,mode", CASES)
def test_hessian_vector_product_of_the_training_loss(name, impl, mode):
    """Forward-over-reverse HVP of the cross-entropy w.r.t. the parameters, in float64, equals
    reverse-over-reverse to rounding, and a central difference of the gradient to its error.

    The step is tiny (1e-7) because the network is piecewise smooth (ReLU, hardswish): a larger
    step moves pre-activations across kinks, where the gradient jumps and a difference quotient
    measures the jump (measured: relative error 2 to 40 at a step of 1e-4 on M0)."""
    graphdef, params, rest = build(name, impl, mode)
    with jax.enable_x64():
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        params, rest64 = f64(params), f64(rest)
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, 3)), jnp.float64)
        labels = jnp.asarray(rng.integers(0, CLASSES, BATCH))
        v = random_like(params, 4)

        def loss(p):
            out = nnx.merge(graphdef, p, rest64, copy=True)(x)
            return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

        def inner(a, b):
            return sum(
                jnp.vdot(s, t) for s, t in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            )

        grad = jax.jit(jax.grad(loss))
        fwd_rev = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
        rev_rev = jax.jit(jax.grad(lambda p, v: inner(jax.grad(loss)(p), v)))(params, v)
        eps = 1e-7
        plus = grad(jax.tree.map(lambda a, b: a + eps * b, params, v))
        minus = grad(jax.tree.map(lambda a, b: a - eps * b, params, v))
        fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps), plus, minus)

    def rel(a, b) -> float:
        d = jax.tree.map(jnp.subtract, a, b)
        return float(np.sqrt(vdot(d, d) / vdot(b, b)))

    assert vdot(rev_rev, rev_rev) > 1e-6  # not degenerate
    assert rel(fwd_rev, rev_rev) <= 1e-9, "forward-over-reverse vs reverse-over-reverse"
    err = rel(fwd_rev, fd)
    assert err <= 1e-5, f"HVP vs finite differences: relative error {err:.2g}"
