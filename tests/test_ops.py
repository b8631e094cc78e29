"""The primitives of :mod:`cga_jax.ops` and the XLA-CPU kernels of :mod:`cga_jax.cpu_kernels`
against ``lax``: values, reverse-mode and forward-mode derivatives, in every ``impl`` mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cga_jax import cpu_kernels, ops

MODES = ("standard", "cpu", "auto")


def _lax_conv(x, kernel, stride, padding, groups=1):
    """The definition: ``lax``'s convolution at full precision. kernel (kh, kw, Ci/g, Co)."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision="highest",
    )  # fmt: skip


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * {scale:.3g}"


def _check_derivatives(f, ref, args, tol, what):
    """f and ref agree in value, in the VJP of a random cotangent and in the JVP of random
    tangents (the JVP is also checked against the VJP: <J t, w> == <t, J^T w>)."""
    rng = np.random.default_rng(0)
    y = f(*args)
    _close(y, ref(*args), tol, f"{what} value")
    w = jnp.asarray(rng.normal(size=y.shape), y.dtype)
    vjp_f = jax.vjp(f, *args)[1](w)
    vjp_r = jax.vjp(ref, *args)[1](w)
    for i, (a, b) in enumerate(zip(vjp_f, vjp_r, strict=True)):
        _close(a, b, tol, f"{what} vjp arg {i}")
    tangents = tuple(jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in args)
    jvp_f = jax.jvp(f, args, tangents)[1]
    _close(jvp_f, jax.jvp(ref, args, tangents)[1], tol, f"{what} jvp")
    lhs = float(jnp.vdot(jvp_f, w))
    rhs = sum(float(jnp.vdot(t, g)) for t, g in zip(tangents, vjp_f, strict=True))
    assert abs(lhs - rhs) <= tol * max(1.0, abs(lhs)) * 10, f"{what}: jvp/vjp not adjoint"


@pytest.mark.parametrize(
    "h, w, k, stride, padding",
    [(7, 7, 3, 1, 1), (8, 9, 3, 2, 1), (14, 14, 7, 1, 3), (5, 6, 5, 2, 2), (9, 9, 3, 2, 0)],
)
def test_cpu_depthwise_matches_lax(h, w, k, stride, padding):
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    x = jnp.asarray(rng.normal(size=(2, h, w, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 4)), jnp.float32)

    def f(x, kern):
        return cpu_kernels.depthwise_conv(x, kern, stride, padding)

    def ref(x, kern):
        return _lax_conv(x, kern[:, :, None, :], stride, padding, groups=4)

    _check_derivatives(f, ref, (x, kernel), 1e-5, "depthwise")
    _check_derivatives(jax.jit(f), ref, (x, kernel), 1e-5, "depthwise (jit)")


def test_cpu_depthwise_bf16_gradients_keep_dtypes():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.bfloat16)
    loss = lambda a, b: jnp.sum(cpu_kernels.depthwise_conv(a, b, 1, 1))  # noqa: E731
    dx, dk = jax.jit(jax.grad(loss, (0, 1)))(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    assert dx.shape == x.shape and dk.shape == kernel.shape


@pytest.mark.parametrize("stride,padding,cin", [(2, 1, 3), (2, 1, 8), (1, 1, 4), (1, 0, 2)])
def test_cpu_im2col_conv_matches_lax(stride, padding, cin):
    """XLA's conv outside differentiation (bitwise), im2col matmuls under it (odd map sides)."""
    rng = np.random.default_rng(stride * 10 + cin)
    x = jnp.asarray(rng.normal(size=(2, 11, 8, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, 6)), jnp.float32)

    def f(x, k):
        return cpu_kernels.im2col_conv(x, k, stride, padding)

    def xla(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), ((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip

    np.testing.assert_array_equal(np.asarray(f(x, k)), np.asarray(xla(x, k)))
    _check_derivatives(f, lambda x, k: _lax_conv(x, k, stride, padding), (x, k), 1e-5, "im2col")


@pytest.mark.parametrize(
    "stride,padding,cin,k", [(2, 1, 3, 3), (1, 1, 1, 3), (2, 0, 4, 2), (1, 2, 2, 5)]
)
def test_cpu_few_channel_conv_matches_lax(stride, padding, cin, k):
    """The RGB-stem kernel: broadcast multiply-adds forward, im2col kernel derivative."""
    rng = np.random.default_rng(stride * 100 + cin * 10 + k)
    x = jnp.asarray(rng.normal(size=(2, 11, 8, cin)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, cin, 5)), jnp.float32)

    def f(x, kern):
        return cpu_kernels.few_channel_conv(x, kern, stride, padding)

    def ref(x, kern):
        return _lax_conv(x, kern, stride, padding)

    _check_derivatives(f, ref, (x, kern), 1e-5, "few-channel")
    _check_derivatives(jax.jit(f), ref, (x, kern), 1e-5, "few-channel (jit)")


def test_cpu_few_channel_conv_bf16_accumulates_in_float32():
    """bf16 in and out, but the 27 terms of an RGB 3x3 tap sum are accumulated in float32: the
    result is the float32 convolution of the bf16 values, rounded once."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 3)), jnp.bfloat16)
    kern = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
    y = cpu_kernels.few_channel_conv(x, kern, 2, 1)
    assert y.dtype == jnp.bfloat16
    want = cpu_kernels.few_channel_conv(x.astype(jnp.float32), kern.astype(jnp.float32), 2, 1)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(jnp.bfloat16)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,groups",
    [
        (3, 8, 3, 2, 1, 1),  # RGB stem conv
        (8, 16, 3, 2, 1, 1),  # dense stem conv
        (12, 12, 3, 1, 1, 12),  # depthwise
        (12, 12, 5, 2, 2, 12),  # depthwise, stride 2
        (12, 20, 1, 1, 0, 1),  # 1x1
        (12, 8, 3, 1, 1, 4),  # grouped, neither dense nor depthwise
    ],
)
def test_conv2d_every_mode_matches_lax(mode, cin, cout, k, stride, padding, groups):
    rng = np.random.default_rng(cin + cout + k + groups)
    x = jnp.asarray(rng.normal(size=(2, 9, 10, cin)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)

    def f(x, kern):
        return ops.conv2d(x, kern, stride, padding, groups, impl=mode)

    def ref(x, kern):
        return _lax_conv(x, kern, stride, padding, groups)

    _check_derivatives(jax.jit(f), ref, (x, kern), 1e-5, f"conv2d[{mode}]")


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="input has 5 channels"):
        ops.conv2d(jnp.zeros((1, 4, 4, 5)), jnp.zeros((3, 3, 4, 8)), 1, 1)


@pytest.mark.parametrize("mode", MODES)
def test_spatial_mean_every_mode(mode):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 5, 6)), jnp.float32)
    want = np.asarray(x, np.float64).mean(axis=(1, 2), keepdims=True)
    got = jax.jit(lambda v: ops.spatial_mean(v, impl=mode))(x)
    assert got.shape == (3, 1, 1, 6)
    _close(got, want, 1e-6, f"spatial_mean[{mode}]")
    _check_derivatives(
        lambda v: ops.spatial_mean(v, impl=mode),
        lambda v: jnp.mean(v, axis=(1, 2), keepdims=True),
        (x,),
        1e-6,
        f"spatial_mean[{mode}]",
    )


def test_column_broadcast_transposes_to_column_sum():
    for n in (7, 1024, 1025, 5000):
        v = jnp.arange(3, dtype=jnp.float32)
        b = cpu_kernels.column_broadcast(v, n)
        np.testing.assert_array_equal(np.asarray(b), np.broadcast_to(np.arange(3.0), (n, 3)))
        g = jnp.asarray(np.random.default_rng(n).normal(size=(n, 3)), jnp.float32)
        (t,) = jax.linear_transpose(lambda u, n=n: cpu_kernels.column_broadcast(u, n), v)(g)
        np.testing.assert_array_equal(np.asarray(t), np.asarray(cpu_kernels.column_sum(g)))


def _bn_plain(x2, scale, bias, eps=1e-5):
    """Training-mode BN written plainly, for autodiff in float64 (the exact reference)."""
    mean = jnp.mean(x2, axis=0)
    var = jnp.mean((x2 - mean) ** 2, axis=0)
    return (x2 - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [2, 50, 3000])
def test_batch_norm_train_derivatives_equal_autodiff_in_float64(mode, n):
    """The custom rule is exact: in float64 its VJP, JVP and a Hessian-vector product equal
    autodiff of the plain formula (incl. the mean/variance outputs)."""
    with jax.enable_x64():
        rng = np.random.default_rng(n)
        x2 = jnp.asarray(rng.normal(size=(n, 5)) * 3 + 1, jnp.float64)
        scale = jnp.asarray(rng.uniform(0.5, 1.5, size=5), jnp.float64)
        bias = jnp.asarray(rng.normal(size=5), jnp.float64)

        def f(x2, scale, bias):
            return ops.batch_norm_train(x2, scale, bias, 1e-5, impl=mode)

        args = (x2, scale, bias)
        w = tuple(jnp.asarray(rng.normal(size=o.shape), jnp.float64) for o in f(*args))
        _, vf = jax.vjp(f, *args)
        _, vr = jax.vjp(_bn_plain, *args)
        for a, b in zip(vf(w), vr(w), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9)
        t = tuple(jnp.asarray(rng.normal(size=a.shape), jnp.float64) for a in args)
        for a, b in zip(jax.jvp(f, args, t)[1], jax.jvp(_bn_plain, args, t)[1], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9)

        def loss(fn):
            return lambda x2: jnp.sum(jnp.tanh(fn(x2, scale, bias)[0]) * w[0])

        hvp_f = jax.jvp(jax.grad(loss(f)), (x2,), (t[0],))[1]
        hvp_r = jax.jvp(jax.grad(loss(_bn_plain)), (x2,), (t[0],))[1]
        np.testing.assert_allclose(np.asarray(hvp_f), np.asarray(hvp_r), rtol=1e-8, atol=1e-8)


def test_batch_norm_small_group_gradient_is_accurate_in_float32():
    """On a batch of 2 the closed form keeps float32 digits that autodiff through the
    statistics loses (the head's BatchNorm1d): compare both against float64."""
    rng = np.random.default_rng(3)
    x2 = rng.normal(size=(2, 64)).astype(np.float32) * 10 + 100
    scale = rng.uniform(0.5, 1.5, size=64).astype(np.float32)
    bias = np.zeros(64, np.float32)
    g = rng.normal(size=(2, 64)).astype(np.float32)
    with jax.enable_x64():
        args64 = tuple(jnp.asarray(a, jnp.float64) for a in (x2, scale, bias))
        _, vjp = jax.vjp(lambda a: _bn_plain(a, *args64[1:])[0], args64[0])
        (exact,) = vjp(jnp.asarray(g, jnp.float64))
    for mode in MODES:
        _, vjp = jax.vjp(
            lambda a, m=mode: ops.batch_norm_train(a, scale, bias, 1e-5, impl=m)[0], x2
        )
        _close(vjp(g)[0], exact, 1e-4, f"bn grad[{mode}]")
