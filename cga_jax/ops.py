"""The primitives every layer calls, NHWC, with PyTorch's semantics - and the one switch that
picks their implementation.

Primitives: :func:`conv2d` (dense, depthwise and grouped, PyTorch's explicit symmetric padding),
:func:`batch_norm_train` (training-mode BatchNorm with the closed-form gradient),
:func:`spatial_mean`. Each has a *standard* implementation - plain ``lax``/``jnp``, the ops XLA
optimises on GPU and TPU (``lax.conv_general_dilated`` with ``feature_group_count`` for depthwise
convs, ``jnp.sum`` for statistics) - and an XLA-CPU implementation in :mod:`cga_jax.cpu_kernels`.

The switch, ``impl``, takes one of :data:`IMPLS`:

* ``"auto"`` (the default): in a process whose default JAX backend is CPU,
  ``lax.platform_dependent`` picks when the computation is lowered - the XLA-CPU kernels for
  ``cpu``, the standard ops for every other platform - so a CPU machine runs its kernels and
  still exports TPU/CUDA graphs of the standard path; a multi-platform ``jax.export`` carries
  both and selects at run time. In a GPU/TPU process, the standard ops directly: tracing and
  differentiating the CPU branch there would only add compile time (docs/bench.md), and
  lowering for CPU from such a process is rare (it still computes the same, standard ops).
* ``"standard"``: the standard ops on every platform (ONNX export, comparisons).
* ``"cpu"``: the XLA-CPU kernels on every platform.

Layers store their mode as a static attribute when they are built, so a jitted function
retraces when it changes: build under :func:`use_impl` (or pass ``impl=`` to
``create_model`` / ``EfficientViTConfig``), or change a built model with
:func:`cga_jax.layers.set_impl`. Functions called directly take ``impl=`` (default: the
:func:`use_impl` setting at trace time).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cga_jax import cpu_kernels
from cga_jax.config import IMPLS
from cga_jax.cpu_kernels import ColumnSums, is_zero, sum_terms

__all__ = ["IMPLS", "batch_norm_train", "conv2d", "default_impl", "spatial_mean", "use_impl"]
_DEFAULT = contextvars.ContextVar("cga_jax_impl", default="auto")


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else a ``ValueError`` naming the choices."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def default_impl() -> str:
    """The mode that layers built now record (``"auto"`` unless inside :func:`use_impl`)."""
    return _DEFAULT.get()


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[str]:
    """Within the block, layers are built with (and direct calls default to) ``impl``."""
    token = _DEFAULT.set(check_impl(impl))
    try:
        yield impl
    finally:
        _DEFAULT.reset(token)


def select(
    impl: str | None, standard: Callable[..., Any], cpu: Callable[..., Any], *args: Any
) -> Any:
    """Call ``standard(*args)`` or ``cpu(*args)`` as ``impl`` says (``None``: the default)."""
    mode = check_impl(default_impl() if impl is None else impl)
    if mode == "standard":
        return standard(*args)
    if mode == "cpu":
        return cpu(*args)
    if jax.default_backend() != "cpu":
        return standard(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=standard)


# ---- convolution -----------------------------------------------------------------------------
def _standard_conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    kh, kw, _, _ = kernel.shape
    if kh == kw == 1 and groups == 1 and stride == 1 and padding == 0:
        return jnp.einsum("...c,co->...o", x, kernel[0, 0])  # a 1x1 conv is a matmul
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _cpu_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    """The XLA-CPU kernels, dispatched on static shapes: depthwise convs as shifted multiply-adds,
    dense convs over few input channels (the RGB stem) as broadcast multiply-adds, other dense
    convs as im2col; 1x1 convs (an ``einsum``) and other grouped convs as the standard path."""
    kh, kw, ipg, co = kernel.shape
    ci = x.shape[-1]
    pointwise = kh == kw == 1 and stride == 1 and padding == 0
    if groups == ci == co and ipg == 1:
        return cpu_kernels.depthwise_conv(x, kernel[:, :, 0, :], stride, padding)
    if groups == 1 and not pointwise and ci <= cpu_kernels.MAX_FEW_CHANNELS:
        return cpu_kernels.few_channel_conv(x, kernel, stride, padding)
    if groups == 1 and not pointwise:
        return cpu_kernels.im2col_conv(x, kernel, stride, padding)
    return _standard_conv2d(x, kernel, stride, padding, groups)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    *,
    impl: str | None = None,
) -> jax.Array:
    """``torch.nn.functional.conv2d`` in NHWC with symmetric zero padding ``padding``.

    x: (B, H, W, Ci); kernel: (kh, kw, Ci // groups, Co) (HWIO) -> (B, Ho, Wo, Co). ``groups ==
    Ci == Co`` is a depthwise convolution. (``'SAME'`` padding would pad (0, 1) at stride 2 where
    PyTorch pads (1, 1), hence explicit padding.)
    """
    if x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(
            f"conv2d: input has {x.shape[-1]} channels, kernel {kernel.shape} with groups={groups} "
            f"expects {kernel.shape[2] * groups}"
        )
    std = functools.partial(_standard_conv2d, stride=stride, padding=padding, groups=groups)
    cpu = functools.partial(_cpu_conv2d, stride=stride, padding=padding, groups=groups)
    return select(impl, std, cpu, x, kernel)


# ---- spatial mean ----------------------------------------------------------------------------
def _standard_spatial_mean(x: jax.Array) -> jax.Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.mean(x, axis=(1, 2), keepdims=True, dtype=acc).astype(x.dtype)


def spatial_mean(x: jax.Array, *, impl: str | None = None) -> jax.Array:
    """(B, H, W, C) -> (B, 1, 1, C), accumulated in at least float32."""
    return select(impl, _standard_spatial_mean, cpu_kernels.spatial_mean, x)


# ---- training-mode BatchNorm -----------------------------------------------------------------
STANDARD_SUMS = ColumnSums(
    sum=lambda x2: jnp.sum(x2, axis=0),
    broadcast=lambda v, n: jnp.broadcast_to(v, (n, v.shape[0])),
)


def _bn_forward(x2, scale, bias, eps, sums):
    n = x2.shape[0]
    mean = sums.sum(x2) / n
    centered = x2 - mean
    var = sums.sum(centered * centered) / n  # two passes: no E[x^2] - E[x]^2 cancellation
    invstd = lax.rsqrt(var + eps)
    xhat = centered * invstd
    return (xhat * scale + bias, mean, var), (centered, invstd, xhat)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _bn_train(x2, scale, bias, eps: float, sums: ColumnSums):
    return _bn_forward(x2, scale, bias, eps, sums)[0]


def _bn_train_jvp(eps, sums, primals, tangents):
    """Tangent of y as ``a * tx + bcast(tbias - a * mean(tx)) + xhat * bcast(tscale - a *
    mean(tx * xhat))`` with ``a = scale * invstd``: the projected form, whose transpose is
    PyTorch's closed-form input gradient. Each (C,) vector is broadcast once, so the transpose
    reduces ``g`` and ``g * xhat`` once each and shares the sums with the scale and bias gradients.
    Autodiff through the statistics instead sums large terms that cancel and loses float32 digits
    when the normalised group is small (the head's BatchNorm1d on a batch of 2). Symbolic-zero
    tangents (e.g. of a frozen scale) are skipped."""
    x2, scale, bias = primals
    tx, tscale, tbias = tangents
    n = x2.shape[0]
    out, (centered, invstd, xhat) = _bn_forward(x2, scale, bias, eps, sums)
    y = out[0]
    shift, slope, terms = [], [], []  # (C,) terms of bcast(shift) and xhat * bcast(slope)
    tmean, tvar = jnp.zeros_like(out[1]), jnp.zeros_like(out[2])
    if not is_zero(tx):
        a = scale * invstd
        tmean = sums.sum(tx) / n
        terms.append(a * tx)
        shift.append(-a * tmean)
        slope.append(-a * (sums.sum(tx * xhat) / n))
        tvar = 2.0 * sums.sum(centered * tx) / n
    if not is_zero(tbias):
        shift.append(tbias)
    if not is_zero(tscale):
        slope.append(tscale)
    if shift:
        terms.append(sums.broadcast(sum_terms(shift, tmean), n))
    if slope:
        terms.append(xhat * sums.broadcast(sum_terms(slope, tmean), n))
    return out, (sum_terms(terms, y), tmean, tvar)


_bn_train.defjvp(_bn_train_jvp, symbolic_zeros=True)


def batch_norm_train(
    x2: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, *, impl: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm of (N, C): returns (y (N, C), batch mean (C,), biased batch
    variance (C,)), all in ``x2``'s dtype (call it with float32 or float64).

    Differentiable in both modes; the input gradient is the closed form PyTorch uses. The CPU
    path reduces with two-level column sums (:func:`cga_jax.cpu_kernels.column_sum`).
    """
    std = functools.partial(_bn_train, eps=eps, sums=STANDARD_SUMS)
    cpu = functools.partial(_bn_train, eps=eps, sums=cpu_kernels.TWO_LEVEL_SUMS)
    return select(impl, std, cpu, x2, scale, bias)
