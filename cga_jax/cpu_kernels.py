"""XLA-CPU kernels: the same functions as :mod:`cga_jax.ops`'s standard path, for XLA-CPU.

Selected by the ``kernels`` switch of :mod:`cga_jax.ops` (automatically on CPU); never needed on
GPU or TPU, where XLA's own convolutions and reductions are the fast path. Each kernel computes the
same value as its standard counterpart (up to float rounding; ``tests/test_ops.py``) and differs only
in how XLA-CPU runs it (docs/bench.md has the measurements):

* depthwise convolution: a sum of ``kh*kw`` shifted multiply-adds (XLA-CPU's grouped
  ``conv_general_dilated`` is far slower on these shapes);
* dense convolution over <= 4 input channels (the RGB stem conv): broadcast multiply-adds,
  one fused loop;
* other dense convolutions: XLA's convolution in the forward pass, im2col matmuls under
  differentiation (XLA-CPU's convolution kernel gradient is slow);
* column sums (BatchNorm statistics, kernel gradients): two levels of ~sqrt(N) partial sums,
  which keeps float32 rounding near sqrt(N) ulps;
* spatial mean: a batched matmul with a ones vector (stops XLA-CPU fusing the producer into a
  slow middle-axis reduction).

Derivatives are ``custom_jvp`` rules (forward mode works; reverse mode is their transpose), each
written so that the transposed rule is the fast gradient: kernel gradients become one matmul or
one two-level column sum per tap.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

MAX_FEW_CHANNELS = 4  # dense convs with at most this many input channels take few_channel_conv


# ---- column sums -----------------------------------------------------------------------------
def _blocks(n: int) -> tuple[int, int]:
    """(number of blocks, block length) of the two-level sum over ``n`` rows."""
    block = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    return -(-n // block), block


def column_sum(x2: jax.Array) -> jax.Array:
    """Column sums of (N, C) -> (C,) as a sum of ~sqrt(N) partial sums of ~sqrt(N) rows each."""
    n, c = x2.shape
    if n <= 1024:
        return jnp.sum(x2, axis=0)
    nblocks, block = _blocks(n)
    if nblocks * block != n:
        x2 = jnp.pad(x2, ((0, nblocks * block - n), (0, 0)))
    return jnp.sum(jnp.sum(x2.reshape(nblocks, block, c), axis=1), axis=0)


def column_broadcast(v: jax.Array, n: int) -> jax.Array:
    """(C,) -> (n, C), built so that its transpose is :func:`column_sum` (same two levels)."""
    (c,) = v.shape
    if n <= 1024:
        return jnp.broadcast_to(v, (n, c))
    nblocks, block = _blocks(n)
    rows = jnp.broadcast_to(jnp.broadcast_to(v, (nblocks, c))[:, None, :], (nblocks, block, c))
    return rows.reshape(nblocks * block, c)[:n]


@dataclasses.dataclass(frozen=True)
class ColumnSums:
    """A column reduction and the broadcast it transposes to (BatchNorm's statistics)."""

    sum: object  # (N, C) -> (C,)
    broadcast: object  # ((C,), N) -> (N, C)


TWO_LEVEL_SUMS = ColumnSums(column_sum, column_broadcast)


# ---- convolutions ----------------------------------------------------------------------------
def is_zero(tangent) -> bool:
    """Whether a ``custom_jvp(symbolic_zeros=True)`` tangent is a symbolic zero: its term is
    skipped (an instantiated zero would be a whole convolution of zeros at run time, e.g. for
    the image, which is not differentiated)."""
    return isinstance(tangent, SymbolicZero)


def sum_terms(terms: list, like: jax.Array) -> jax.Array:
    """The sum of the tangent terms that are not symbolic zeros (zeros shaped like ``like``)."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return jnp.zeros_like(like)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _pad_hw(x: jax.Array, padding: int) -> jax.Array:
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _out_hw(xp: jax.Array, kh: int, kw: int, stride: int) -> tuple[int, int]:
    return (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1


def _tap(xp: jax.Array, i: int, j: int, ho: int, wo: int, stride: int) -> jax.Array:
    """The input window that kernel tap (i, j) multiplies: xp (B, Hp, Wp, C) -> (B, ho, wo, C)."""
    b, _, _, c = xp.shape
    end = (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c)
    return lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


def _shifted_taps(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Valid depthwise correlation of a padded map: xp (B, Hp, Wp, C), kernel (kh, kw, C)."""
    kh, kw, _ = kernel.shape
    ho, wo = _out_hw(xp, kh, kw, stride)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, ho, wo, stride) * kernel[i, j]
            out = term if out is None else out + term
    return out


def _kernel_taps(xp: jax.Array, tk: jax.Array, stride: int) -> jax.Array:
    """:func:`_shifted_taps` for a kernel *tangent*: each tap row is split off in one ``split``
    and broadcast with :func:`column_broadcast`, so the transpose (the kernel gradient) is one
    two-level column sum per tap, concatenated - not ``kh*kw`` pads into a zero kernel."""
    kh, kw, c = tk.shape
    ho, wo = _out_hw(xp, kh, kw, stride)
    b = xp.shape[0]
    rows = jnp.split(tk.reshape(kh * kw, c), kh * kw, axis=0)
    out = None
    for t, row in enumerate(rows):
        i, j = divmod(t, kw)
        w = column_broadcast(row.reshape(c), b * ho * wo).reshape(b, ho, wo, c)
        term = _tap(xp, i, j, ho, wo, stride) * w
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as shifted multiply-adds.

    x: (B, H, W, C); kernel: (kh, kw, C); zero padding ``padding`` on every side, like
    ``torch.nn.Conv2d(C, C, k, stride, padding, groups=C)``. Returns (B, Ho, Wo, C).
    """
    return _shifted_taps(_pad_hw(x, padding), kernel, stride)


def _depthwise_jvp(stride, padding, primals, tangents):
    x, kernel = primals
    tx, tk = tangents
    y = depthwise_conv(x, kernel, stride, padding)
    terms = [None, None]
    if not is_zero(tx):
        terms[0] = _shifted_taps(_pad_hw(tx, padding), kernel, stride)
    if not is_zero(tk):
        # The barrier keeps XLA from merging the kernel gradient's taps with the forward's
        # identical slices (CSE): shared, each tap would be written to memory with x's producer
        # recomputed into every one of them.
        xb = lax.optimization_barrier(x)
        terms[1] = _kernel_taps(_pad_hw(xb, padding), tk.astype(x.dtype), stride)
    return y, sum_terms(terms, y)


depthwise_conv.defjvp(_depthwise_jvp, symbolic_zeros=True)


def _im2col(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> jax.Array:
    """(B, H, W, Ci) -> (B, Ho, Wo, kh*kw*Ci): the strided taps in the kernel's (kh, kw, Ci)
    order, concatenated on the channel axis."""
    xp = _pad_hw(x, padding)
    ho, wo = _out_hw(xp, kh, kw, stride)
    taps = [_tap(xp, i, j, ho, wo, stride) for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _matmul(cols: jax.Array, kernel: jax.Array) -> jax.Array:
    """cols (B, Ho, Wo, kh*kw*Ci) @ kernel (kh, kw, Ci, Co) reshaped -> (B, Ho, Wo, Co), as one 2-D
    matmul: its transpose (the kernel gradient) then runs as XLA-CPU's fast (rows, K)^T @ (rows,
    Co) dot, which a 4-D einsum's transpose does not."""
    kh, kw, ci, co = kernel.shape
    k = kh * kw * ci
    return (cols.reshape(-1, k) @ kernel.reshape(k, co)).reshape(cols.shape[:-1] + (co,))


def _im2col_conv_jvp(stride, padding, primals, tangents):
    """Forward and tangent of a dense conv as im2col matmuls: transposed, the kernel gradient is
    one matmul over the patches and the input gradient a matmul plus the gather's transpose."""
    x, kernel = primals
    tx, tk = tangents
    kh, kw = kernel.shape[:2]
    cols = _im2col(x, kh, kw, stride, padding)
    y = _matmul(cols, kernel)
    terms = [
        None if is_zero(tx) else _matmul(_im2col(tx, kh, kw, stride, padding), kernel),
        None if is_zero(tk) else _matmul(cols, tk),
    ]
    return y, sum_terms(terms, y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def few_channel_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution over few input channels as broadcast multiply-adds.

    x: (B, H, W, Ci); kernel: (kh, kw, Ci, Co) (HWIO) -> (B, Ho, Wo, Co), PyTorch padding. The
    output is ``sum over (i, j, c) of tap_ij[..., c:c+1] * kernel[i, j, c]``, accumulated in at
    least float32: one loop that XLA fuses with what follows.
    """
    kh, kw, ci, _ = kernel.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xp = _pad_hw(x, padding).astype(acc)
    ho, wo = _out_hw(xp, kh, kw, stride)
    k = kernel.astype(acc)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, ho, wo, stride)
            for c in range(ci):
                term = tap[..., c : c + 1] * k[i, j, c]
                out = term if out is None else out + term
    return out.astype(x.dtype)


def _few_channel_jvp(stride, padding, primals, tangents):
    """The forward stays the multiply-adds; the kernel tangent is an im2col matmul (so its
    transpose, the kernel gradient, is one matmul). The input term only matters when the image
    itself is differentiated."""
    x, kernel = primals
    tx, tk = tangents
    kh, kw = kernel.shape[:2]
    y = few_channel_conv(x, kernel, stride, padding)
    terms = [
        None if is_zero(tx) else few_channel_conv(tx, kernel, stride, padding),
        None if is_zero(tk) else _matmul(_im2col(x, kh, kw, stride, padding), tk).astype(y.dtype),
    ]
    return y, sum_terms(terms, y)


few_channel_conv.defjvp(_few_channel_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution: XLA's convolution outside differentiation, im2col matmuls under it.

    x: (B, H, W, Ci); kernel: (kh, kw, Ci, Co) (HWIO) -> (B, Ho, Wo, Co). Both forms compute the
    same sums in a different order.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


im2col_conv.defjvp(_im2col_conv_jvp, symbolic_zeros=True)


# ---- spatial mean ----------------------------------------------------------------------------
def spatial_mean(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 1, 1, C), summed in at least float32 as a batched matmul with a ones
    vector, then divided by H*W."""
    b, h, w, c = x.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    ones = jnp.ones((b, h * w), x.dtype)
    s = jnp.einsum("bpc,bp->bc", x.reshape(b, h * w, c), ones, preferred_element_type=acc)
    return (s / (h * w)).astype(x.dtype).reshape(b, 1, 1, c)
