"""The convolution kernels of :mod:`cga_jax.ops` against XLA's own convolution, values and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cga_jax import ops


def _grouped_reference(x, kernel, stride, padding):
    """``lax``'s grouped convolution: the definition the shifted-add form must equal."""
    return jax.lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision="highest",
    )


@pytest.mark.parametrize(
    "h, w, k, stride, padding",
    [(7, 7, 3, 1, 1), (8, 9, 3, 2, 1), (14, 14, 7, 1, 3), (5, 6, 5, 2, 2), (9, 9, 3, 2, 0)],
)
def test_depthwise_values_and_gradients(h, w, k, stride, padding):
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    x = jnp.asarray(rng.normal(size=(2, h, w, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 4)), jnp.float32)
    y = ops.depthwise_conv(x, kernel, stride, padding)
    ref = _grouped_reference(x, kernel, stride, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b, stride, padding) * cot)

    got = jax.grad(loss(ops.depthwise_conv), (0, 1))(x, kernel)
    want = jax.grad(loss(_grouped_reference), (0, 1))(x, kernel)
    for g, r, name in zip(got, want, ("input", "kernel"), strict=True):
        scale = max(1.0, float(jnp.abs(r).max()))
        assert float(jnp.abs(g - r).max()) <= 1e-5 * scale, f"{name} gradient differs"


def test_depthwise_under_jit_and_bf16():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda a, b: jnp.sum(ops.depthwise_conv(a, b, 1, 1)), (0, 1)))
    dx, dk = f(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    assert dx.shape == x.shape and dk.shape == kernel.shape


@pytest.mark.parametrize("stride,padding,cin", [(2, 1, 3), (2, 1, 8), (1, 1, 4), (1, 0, 2)])
def test_im2col_conv_values_and_gradients_match_lax(stride, padding, cin):
    """Outside differentiation XLA's conv; under vjp the im2col matmul with its own backward.
    Both must agree with lax's convolution and its autodiff gradients (odd map sides too)."""
    rng = np.random.default_rng(stride * 10 + cin)
    x = jnp.asarray(rng.normal(size=(2, 11, 8, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, 6)), jnp.float32)

    def ref(x, k):
        return ops.dense_conv(x, k, stride, padding)

    def new(x, k):
        return ops.im2col_conv(x, k, stride, padding)

    np.testing.assert_array_equal(np.asarray(new(x, k)), np.asarray(ref(x, k)))
    y_train, _ = jax.vjp(new, x, k)  # the im2col forward
    np.testing.assert_allclose(np.asarray(y_train), np.asarray(ref(x, k)), rtol=1e-5, atol=1e-5)

    w = jnp.asarray(rng.normal(size=ref(x, k).shape), jnp.float32)

    def loss(f):  # linear: the gradients do not depend on the forward's rounding
        return lambda x, k: jnp.sum(f(x, k) * w)

    gr = jax.grad(loss(ref), (0, 1))(x, k)
    gn = jax.grad(loss(new), (0, 1))(x, k)
    for a, b in zip(gn, gr, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
