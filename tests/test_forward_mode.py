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
from plugin_helpers import randomize_nnx

import cga_jax

CASES = [
    pytest.param(name, impl, mode, marks=[pytest.mark.slow] if name.endswith("m4") else [])
    for name in ("efficientvit_m0", "efficientvit_m4")
    for impl in ("standard", "cpu")
    for mode in ("eval", "train")
]
BATCH, SIDE, CLASSES = 8, 32, 10  # train-mode BN is well conditioned from a batch of 8


def build(name: str, impl: str, mode: str):
    """(graphdef, params, rest) of a model with random, well-scaled weights and statistics."""
    model = nnx.eval_shape(lambda: cga_jax.create_model(name, num_classes=CLASSES, impl=impl))
    randomize_nnx(model, seed=3)
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


@pytest.mark.parametrize("name,impl,mode", CASES)
def test_hessian_vector_product_of_the_training_loss(name, impl, mode):
    """Forward-over-reverse HVP of the cross-entropy w.r.t. the parameters, in float64, equals
    central finite differences of the gradient."""
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

        eps = 1e-4

        @jax.jit
        def both(p, v):
            hvp = jax.jvp(jax.grad(loss), (p,), (v,))[1]
            shifted = jax.tree.map(lambda a, b: jnp.stack([a + eps * b, a - eps * b]), p, v)
            g = jax.vmap(jax.grad(loss))(shifted)  # the gradient at p + eps v and p - eps v
            return hvp, jax.tree.map(lambda a: (a[0] - a[1]) / (2 * eps), g)

        hvp, fd = both(params, v)
        num = np.sqrt(
            vdot(jax.tree.map(jnp.subtract, hvp, fd), jax.tree.map(jnp.subtract, hvp, fd))
        )
        den = np.sqrt(vdot(fd, fd))
        assert den > 1e-6
        assert num <= 1e-6 * den, f"HVP vs finite differences: relative error {num / den:.2g}"
