"""Building blocks, NHWC. Module and attribute names mirror timm's ``efficientvit_msra`` so that a
PyTorch key maps to a Flax path by renaming leaves only (``weight`` -> ``kernel``/``scale``,
``running_mean`` -> ``mean``, ``running_var`` -> ``var``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from cga_jax.ops import (
    batch_norm_train,
    check_impl,
    conv2d,
    default_impl,
    spatial_mean,
)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
    """U(-bound, bound) float32. Drawn with numpy from the stream's key when the key is concrete:
    jax.random would compile one small kernel per distinct shape (~80 per model, ~20 s of CPU);
    under tracing (``nnx.eval_shape``/``jit``) it falls back to jax.random."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))


def _trunc_normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, limit: float) -> jax.Array:
    """N(0, std) truncated to [-limit, limit] (timm's ``trunc_normal_``), float32."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        init = nnx.initializers.truncated_normal(std, lower=-limit / std, upper=limit / std)
        return init(key, shape, jnp.float32)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    out = rng.normal(0.0, std, shape)
    bad = np.abs(out) > limit
    while bad.any():
        out[bad] = rng.normal(0.0, std, int(bad.sum()))
        bad = np.abs(out) > limit
    return jnp.asarray(out.astype(np.float32))


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.0) -> int:
    """Round a channel count to a multiple of ``divisor`` (timm's rule, as in its SE module)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _impl(impl: str | None) -> str:
    """The mode a layer records: ``impl``, or the :func:`cga_jax.ops.use_impl` default."""
    return check_impl(default_impl() if impl is None else impl)


def set_impl(model: nnx.Module, impl: str) -> nnx.Module:
    """Set the implementation switch (``"auto"``, ``"standard"`` or ``"cpu"``, see
    :mod:`cga_jax.ops`) of every layer of ``model`` in place; returns ``model``.

    The mode is a static attribute: jitted functions of the model retrace after a change.
    """
    check_impl(impl)
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "impl") and isinstance(m.impl, str):
            m.impl = impl
    return model


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis with PyTorch semantics.

    Training mode normalises with the batch mean and the *biased* batch variance, and updates
    ``mean``/``var`` with the *unbiased* variance: ``ra = momentum * ra + (1 - momentum) * batch``
    (``momentum=0.9`` here is PyTorch's 0.1). Statistics are reduced in float32 with two passes
    (no ``E[x^2] - E[x]^2`` shortcut); under a data-parallel mesh they cover the global batch.

    x: (..., C) -> (..., C), same dtype as x.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        scale_init: float = 1.0,
        use_running_average: bool = False,
        impl: str | None = None,
    ):
        self.num_features = num_features
        self.impl = _impl(impl)
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.full((num_features,), scale_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            inv = self.scale[...] * lax.rsqrt(self.var[...] + self.epsilon)
            shift = self.bias[...] - self.mean[...] * inv
            return x * inv.astype(x.dtype) + shift.astype(x.dtype)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)  # f32 stats for bf16 activations
        x2 = x.reshape(-1, x.shape[-1]).astype(stat_dtype)
        n = x2.shape[0]
        scale, bias = self.scale[...].astype(stat_dtype), self.bias[...].astype(stat_dtype)
        y, mean, var = batch_norm_train(x2, scale, bias, self.epsilon, impl=self.impl)
        m = self.momentum
        unbiased = var * (n / max(n - 1, 1))
        # set_value, not ``self.mean[...] = ...``: the indexed form compares ``.sharding`` of
        # the traced values, and a tracer answers that with an AttributeError whose message walks
        # the whole jaxpr - quadratic tracing time (72 s of a 100 s M0 train-step lowering).
        self.mean.set_value(m * self.mean[...] + (1.0 - m) * lax.stop_gradient(mean))
        self.var.set_value(m * self.var[...] + (1.0 - m) * lax.stop_gradient(unbiased))
        return y.reshape(x.shape).astype(x.dtype)


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC. ``kernel``: (kh, kw, in // groups, out) (HWIO)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        use_bias: bool = False,
        *,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"channels {in_chs}->{out_chs} not divisible by groups={groups}")
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size, self.stride, self.padding, self.groups = (
            kernel_size,
            stride,
            padding,
            groups,
        )
        self.impl = _impl(impl)
        shape = (kernel_size, kernel_size, in_chs // groups, out_chs)
        # PyTorch's default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), bias likewise
        bound = (in_chs // groups * kernel_size * kernel_size) ** -0.5
        self.kernel = nnx.Param(_uniform(rngs, shape, bound))
        if use_bias:
            self.bias = nnx.Param(_uniform(rngs, (out_chs,), bound))
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_chs) -> (B, H', W', out_chs)."""
        kernel = self.kernel[...].astype(x.dtype)
        y = conv2d(x, kernel, self.stride, self.padding, self.groups, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Linear(nnx.Module):
    """``torch.nn.Linear``. ``kernel``: (in, out)."""

    def __init__(self, in_features: int, out_features: int, *, std: float = 0.02, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_trunc_normal(rngs, (in_features, out_features), std, 2.0))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, in) -> (B, out)."""
        return jnp.dot(x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class ConvNorm(nnx.Module):
    """Conv2d without bias followed by BatchNorm (timm ``ConvNorm``, official ``Conv2d_BN``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups, rngs=rngs)
        self.bn = BatchNorm(out_chs, scale_init=bn_weight_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_chs) -> (B, H', W', out_chs). After BN folding ``bn`` is None."""
        y = self.conv(x)
        return y if self.bn is None else self.bn(y)


class NormLinear(nnx.Module):
    """BatchNorm1d -> dropout -> Linear (timm ``NormLinear``, official ``BN_Linear``)."""

    def __init__(self, in_features: int, out_features: int, *, drop: float = 0.0, rngs: nnx.Rngs):
        self.bn = BatchNorm(in_features)
        self.drop = nnx.Dropout(drop, rngs=rngs) if drop > 0 else nnx.data(None)
        self.linear = Linear(in_features, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, in) -> (B, out). After BN folding ``bn`` is None."""
        if self.bn is not None:
            x = self.bn(x)
        if self.drop is not None:
            x = self.drop(x)
        return self.linear(x)


class ReLU(nnx.Module):
    """Stateless ReLU; a module only so that indices of PyTorch ``Sequential``\\ s line up."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class ConvMlp(nnx.Module):
    """The FFN: 1x1 conv -> ReLU -> 1x1 conv, each with BN. (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.pw1 = ConvNorm(dim, hidden, rngs=rngs)
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pw2(jax.nn.relu(self.pw1(x)))


class ResidualDrop(nnx.Module):
    """``x + m(x)``, with per-sample stochastic depth on the branch when ``drop > 0`` in training."""

    def __init__(self, m: nnx.Module, drop: float = 0.0, *, rngs: nnx.Rngs | None = None):
        self.m = m
        self.drop = drop
        self.deterministic = False
        if drop > 0:
            if rngs is None:
                raise ValueError("ResidualDrop with drop > 0 needs rngs (a 'dropout' stream)")
            self.rngs = rngs["dropout"].fork()
        else:
            self.rngs = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.m(x)
        if self.drop > 0 and not self.deterministic:
            keep = jax.random.bernoulli(
                self.rngs(), 1.0 - self.drop, (x.shape[0],) + (1,) * (x.ndim - 1)
            )
            y = y * keep.astype(y.dtype) / (1.0 - self.drop)
        return x + y


class SqueezeExcite(nnx.Module):
    """timm's SE module: mean-pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 0.25,
        *,
        impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        rd = make_divisible(channels * rd_ratio, 8, round_limit=0.0)
        self.impl = _impl(impl)
        self.fc1 = Conv2d(channels, rd, use_bias=True, impl=impl, rngs=rngs)
        self.fc2 = Conv2d(rd, channels, use_bias=True, impl=impl, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        s = spatial_mean(x, impl=self.impl)  # (B, 1, 1, C)
        s = self.fc2(jax.nn.relu(self.fc1(s)))
        return x * jax.nn.sigmoid(s)
