"""Convolution kernels, NHWC, with PyTorch's padding semantics.

Five paths, chosen from static shapes, each exact on every backend:

* 1x1, stride 1, dense: a matmul (``einsum``) - faster than a conv on XLA-CPU.
* depthwise (``groups == C_in == C_out``): a sum of ``kh*kw`` shifted multiply-adds. XLA-CPU runs
  grouped convolutions (``feature_group_count=C``) ~30x slower than PyTorch; the shifted form is on
  par, and XLA fuses it into one loop on GPU/TPU too.
* dense convs over at most 4 input channels (the stem's first conv, on RGB): a sum of
  ``kh*kw*Ci`` broadcast multiply-adds (:func:`few_channel_conv`), one fused loop; XLA-CPU's
  convolution ran 3-8x slower on these shapes. Its kernel gradient is an im2col matmul.
* other dense convs (``groups == 1``, e.g. the rest of the stem): XLA's convolution forward, but
  an im2col matmul under differentiation (:func:`im2col_conv`), whose gradients are matmuls.
* anything else: ``lax.conv_general_dilated`` with explicit symmetric padding (``'SAME'`` would pad
  (0, 1) at stride 2 where PyTorch pads (1, 1)).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution. x: (B, H, W, Ci), kernel: (Ci, Co) -> (B, H, W, Co)."""
    return jnp.einsum("...c,co->...o", x, kernel)


def _tap(xp: jax.Array, i: int, j: int, ho: int, wo: int, stride: int) -> jax.Array:
    """The input window that kernel tap (i, j) multiplies: xp (B, Hp, Wp, C) -> (B, ho, wo, C)."""
    b, _, _, c = xp.shape
    end = (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c)
    return lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


def _shifted_taps(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Valid (unpadded) depthwise correlation of an already padded map.

    xp: (B, Hp, Wp, C); kernel: (kh, kw, C) -> (B, (Hp - kh) // stride + 1, ..., C).
    """
    _, hp, wp, _ = xp.shape
    kh, kw, _ = kernel.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, ho, wo, stride) * kernel[i, j]
            out = term if out is None else out + term
    return out


def column_sum(x2: jax.Array) -> jax.Array:
    """Column sums of (N, C) -> (C,), as a sum of ~sqrt(N) partial sums of ~sqrt(N) rows each.

    Used for BatchNorm statistics and depthwise kernel gradients. The two levels keep float32
    rounding near sqrt(N) ulps for the 10^4-10^6 rows of a batch of feature maps. On XLA-CPU it
    was as fast as or faster than one ``jnp.sum`` and than the same sums as matmuls with a ones
    vector (which made XLA transpose the whole map first).
    """
    n, c = x2.shape
    if n <= 1024:
        return jnp.sum(x2, axis=0)
    block = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    nblocks = -(-n // block)
    if nblocks * block != n:
        x2 = jnp.pad(x2, ((0, nblocks * block - n), (0, 0)))
    return jnp.sum(jnp.sum(x2.reshape(nblocks, block, c), axis=1), axis=0)


def _pad_hw(x: jax.Array, padding: int) -> jax.Array:
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as shifted multiply-adds.

    x: (B, H, W, C); kernel: (kh, kw, C); zero padding ``padding`` on every side, like
    ``torch.nn.Conv2d(C, C, k, stride, padding, groups=C)``. Returns (B, Ho, Wo, C).

    The kernel gradient is written by hand (one reduction per tap, stacked). Autodiff gives the
    same sums but adds each tap's scalar-row gradient into a zero kernel through its own
    pad + add, ``kh*kw`` extra kernels per convolution for XLA to compile: the hand-written form
    cut the compile time of a block's training step by ~20% at the same run time. The input
    gradient is autodiff's (the transposed shifted adds), which ran faster than a hand-written
    correlation with the flipped kernel.
    """
    return _shifted_taps(_pad_hw(x, padding), kernel, stride)


def _depthwise_fwd(x, kernel, stride, padding):
    return depthwise_conv(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, res, g):
    """g: (B, Ho, Wo, C) -> (dx (B, H, W, C), dkernel (kh, kw, C))."""
    x, kernel = res
    kh, kw, c = kernel.shape
    ho, wo = g.shape[1], g.shape[2]
    # The barrier keeps XLA from merging these taps with the forward's identical slices (CSE):
    # shared, each of the kh*kw taps had to be written to memory, with the producer of x
    # recomputed into every one of them.
    x = lax.optimization_barrier(x)
    xp = _pad_hw(x, padding)
    taps = [
        column_sum((_tap(xp, i, j, ho, wo, stride) * g).reshape(-1, c))
        for i in range(kh)
        for j in range(kw)
    ]
    dk = jnp.stack(taps).reshape(kh, kw, c).astype(kernel.dtype)
    _, x_vjp = jax.vjp(lambda a: _shifted_taps(_pad_hw(a, padding), kernel, stride), x)
    (dx,) = x_vjp(g)
    return dx, dk


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _im2col(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> jax.Array:
    """(B, H, W, Ci) -> (B, Ho, Wo, kh*kw*Ci): the strided taps in the kernel's (kh, kw, Ci)
    order, concatenated on the channel axis."""
    xp = _pad_hw(x, padding)
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    taps = [_tap(xp, i, j, ho, wo, stride) for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _im2col_grads(
    cols: jax.Array,
    kernel: jax.Array,
    x_aval: jax.ShapeDtypeStruct,
    g: jax.Array,
    stride: int,
    padding: int,
) -> tuple[jax.Array, jax.Array]:
    """Gradients of ``cols @ kernel`` through the im2col gather.

    cols: (B, Ho, Wo, kh*kw*Ci); kernel: (kh, kw, Ci, Co); g: (B, Ho, Wo, Co) ->
    (dx like ``x_aval``, dkernel like ``kernel``). dx is the transpose of the gather (shifted
    adds); XLA drops it when the input needs no gradient (an image).
    """
    kh, kw, ci, co = kernel.shape
    dk = jnp.einsum("bhwk,bhwo->ko", cols, g).reshape(kernel.shape).astype(kernel.dtype)
    dcols = jnp.einsum("bhwo,ko->bhwk", g, kernel.reshape(kh * kw * ci, co))
    (dx,) = jax.linear_transpose(lambda a: _im2col(a, kh, kw, stride, padding), x_aval)(dcols)
    return dx, dk


MAX_FEW_CHANNELS = 4  # dense convs with at most this many input channels take few_channel_conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def few_channel_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution over few input channels as broadcast multiply-adds.

    x: (B, H, W, Ci); kernel: (kh, kw, Ci, Co) (HWIO) -> (B, Ho, Wo, Co), PyTorch padding. The
    output is ``sum over (i, j, c) of tap_ij[..., c:c+1] * kernel[i, j, c]`` - ``kh*kw*Ci`` terms,
    accumulated in at least float32, that XLA fuses into one loop with whatever follows (bias,
    ReLU). For the RGB stem conv (Ci=3, 3x3, stride 2) on XLA-CPU this ran at 2.3 ms instead of
    9.6 ms (Co=8, batch 16, one thread) and 4.7 instead of 37 ms (Co=24). Under differentiation
    only ``x`` is kept; the backward gathers the patches and takes the kernel gradient as one
    matmul (:func:`_im2col_grads`).
    """
    kh, kw, ci, _ = kernel.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xp = _pad_hw(x, padding).astype(acc)
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    k = kernel.astype(acc)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, ho, wo, stride)
            for c in range(ci):
                term = tap[..., c : c + 1] * k[i, j, c]
                out = term if out is None else out + term
    return out.astype(x.dtype)


def _few_fwd(x, kernel, stride, padding):
    return few_channel_conv(x, kernel, stride, padding), (x, kernel)


def _few_bwd(stride, padding, res, g):
    x, kernel = res
    kh, kw, _, _ = kernel.shape
    cols = _im2col(x, kh, kw, stride, padding)
    return _im2col_grads(cols, kernel, jax.ShapeDtypeStruct(x.shape, x.dtype), g, stride, padding)


few_channel_conv.defvjp(_few_fwd, _few_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution whose training pass is one matmul over the gathered patches.

    x: (B, H, W, Ci); kernel: (kh, kw, Ci, Co) (HWIO) -> (B, Ho, Wo, Co). Outside
    differentiation this is XLA's convolution (:func:`dense_conv`), the fastest forward. Under
    ``jax.grad``/``vjp`` the forward is the im2col matmul - (B, Ho, Wo, kh*kw*Ci) patches times the
    kernel reshaped to (kh*kw*Ci, Co) - and the patches are kept for the kernel gradient, so both
    gradients are matmuls (plus the patches' transpose: shifted adds). On XLA-CPU the stem's
    training step (four 3x3 stride-2 convolutions) ran ~1.6x faster this way: XLA's own
    convolution kernel gradient ran at ~2 GFLOP/s. Both forwards compute the same sums in a
    different order (float32 rounding apart, equal).
    """
    return dense_conv(x, kernel, stride, padding)


def _im2col_fwd(x, kernel, stride, padding):
    kh, kw, ci, co = kernel.shape
    cols = _im2col(x, kh, kw, stride, padding)
    y = jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * ci, co))
    return y, (cols, kernel, jax.ShapeDtypeStruct(x.shape, x.dtype))


def _im2col_bwd(stride, padding, res, g):
    """g: (B, Ho, Wo, Co) -> (dx (B, H, W, Ci), dkernel (kh, kw, Ci, Co))."""
    cols, kernel, x_aval = res
    return _im2col_grads(cols, kernel, x_aval, g, stride, padding)


im2col_conv.defvjp(_im2col_fwd, _im2col_bwd)


def dense_conv(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1
) -> jax.Array:
    """General convolution. x: (B, H, W, Ci); kernel: (kh, kw, Ci // groups, Co) (HWIO)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
    """Dispatch on static shapes. kernel: (kh, kw, Ci // groups, Co) (HWIO)."""
    kh, kw, ipg, co = kernel.shape
    ci = x.shape[-1]
    if kh == kw == 1 and groups == 1 and stride == 1 and padding == 0:
        return pointwise_conv(x, kernel[0, 0])
    if groups == ci == co and ipg == 1:
        return depthwise_conv(x, kernel[:, :, 0, :], stride, padding)
    if groups == 1 and ci <= MAX_FEW_CHANNELS:
        return few_channel_conv(x, kernel, stride, padding)
    if groups == 1:
        return im2col_conv(x, kernel, stride, padding)
    return dense_conv(x, kernel, stride, padding, groups)
