"""Fold every BatchNorm into its neighbouring conv / linear (the official ``replace_batchnorm``)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cga_jax.layers import BatchNorm, ConvNorm, NormLinear


def _bn_affine(bn: BatchNorm) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Eval-mode BN as ``x * w + b``; w, b: (C,) float32."""
    w = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
    return w, bn.bias[...] - bn.mean[...] * w


def _fuse_conv_norm(m: ConvNorm) -> None:
    w, b = _bn_affine(m.bn)
    m.conv.kernel = nnx.Param(m.conv.kernel[...] * w)  # HWIO: scale the output channels
    old = m.conv.bias[...] if m.conv.bias is not None else 0.0
    m.conv.bias = nnx.Param(old * w + b)
    m.bn = nnx.data(None)


def _fuse_norm_linear(m: NormLinear) -> None:
    w, b = _bn_affine(m.bn)
    kernel = m.linear.kernel[...]  # (in, out)
    m.linear.bias = nnx.Param(m.linear.bias[...] + b @ kernel)
    m.linear.kernel = nnx.Param(kernel * w[:, None])
    m.bn = nnx.data(None)


def fuse_bn(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in eval mode with every conv+BN and BN+linear folded.

    The copy has the same call signature, no ``BatchStat`` left, and (in float32) the same
    outputs as ``model.eval()`` up to rounding (~1e-5 relative). ``model`` is not modified.
    Only meant for inference: the folded model cannot be trained as the original.
    """
    fused = nnx.merge(*nnx.split(model))  # new Variables; arrays are immutable and shared
    fused.eval()
    for _, m in list(nnx.iter_modules(fused)):
        if isinstance(m, ConvNorm) and m.bn is not None:
            _fuse_conv_norm(m)
        elif isinstance(m, NormLinear) and m.bn is not None:
            _fuse_norm_linear(m)
    return fused
