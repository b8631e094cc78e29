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


@pytest.mark.parametrize(
    "stride,padding,cin,k", [(2, 1, 3, 3), (1, 1, 1, 3), (2, 0, 4, 2), (1, 2, 2, 5)]
)
def test_few_channel_conv_values_and_gradients_match_lax(stride, padding, cin, k):
    """The RGB-stem path: broadcast multiply-adds forward, im2col kernel gradient. Values and
    both gradients must equal lax's convolution and its autodiff (odd sides, non-square maps)."""
    rng = np.random.default_rng(stride * 100 + cin * 10 + k)
    x = jnp.asarray(rng.normal(size=(2, 11, 8, cin)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, cin, 5)), jnp.float32)

    def ref(x, kern):
        return jax.lax.conv_general_dilated(
            x, kern, (stride, stride), ((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
        )  # fmt: skip

    def new(x, kern):
        return ops.few_channel_conv(x, kern, stride, padding)

    want = np.asarray(ref(x, kern))
    np.testing.assert_allclose(np.asarray(new(x, kern)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(new)(x, kern)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ops.conv2d(x, kern, stride, padding)), want, rtol=1e-5, atol=1e-5
    )
    w = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def loss(f):
        return lambda x, kern: jnp.sum(f(x, kern) * w)

    gr = jax.grad(loss(ref), (0, 1))(x, kern)
    gn = jax.jit(jax.grad(loss(new), (0, 1)))(x, kern)
    for a, b, name in zip(gn, gr, ("input", "kernel"), strict=True):
        assert a.shape == b.shape, name
        scale = max(1.0, float(jnp.abs(b).max()))
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, f"{name} gradient differs"


def test_few_channel_conv_bf16_accumulates_in_float32():
    """bf16 in and out, but the 27 terms of an RGB 3x3 tap sum are accumulated in float32: the
    result is the float32 convolution of the bf16 values, rounded once."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 3)), jnp.bfloat16)
    kern = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
    y = ops.few_channel_conv(x, kern, 2, 1)
    assert y.dtype == jnp.bfloat16
    want = ops.few_channel_conv(x.astype(jnp.float32), kern.astype(jnp.float32), 2, 1)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(jnp.bfloat16)))
