"""BatchNorm folding for inference: every conv+BN and BN+linear becomes one affine op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cga_jax.layers import ConvNorm, NormLinear


class ChannelBias(nnx.Module):
    """Adds a per-channel bias: (..., C) -> (..., C). Stands where a folded BatchNorm was."""

    def __init__(self, bias: jax.Array):
        self.bias = nnx.Param(bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.bias[...].astype(x.dtype)


class Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _bn_affine(bn) -> tuple[jax.Array, jax.Array]:
    """Eval-mode BN as ``x * a + b``."""
    a = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    return a, bn.bias[...] - bn.mean[...] * a


def fuse_bn(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every ConvNorm and NormLinear folded (eval mode only).

    ConvNorm: ``kernel * a`` per output channel, BN replaced by a bias. NormLinear (BN before the
    linear): ``kernel * a[:, None]`` and ``bias + b @ kernel``. Same call signature and outputs
    as ``model.eval()`` up to float32 rounding; the returned model has no BatchNorm left (calling
    it in training mode is meaningless, it is an inference model).
    """
    fused = nnx.clone(model)
    fused.eval()
    for _, module in list(nnx.iter_modules(fused)):
        if isinstance(module, ConvNorm) and not isinstance(module.bn, ChannelBias):
            a, b = _bn_affine(module.bn)
            module.conv.kernel = nnx.Param(module.conv.kernel[...] * a)  # (kh, kw, I, O) * (O,)
            module.bn = ChannelBias(b)
        elif isinstance(module, NormLinear) and not isinstance(module.bn, Identity):
            a, b = _bn_affine(module.bn)
            w = module.linear.kernel[...]  # (in, out)
            module.linear.bias = nnx.Param(
                module.linear.bias[...] + jnp.dot(b, w, precision="highest")
            )
            module.linear.kernel = nnx.Param(w * a[:, None])
            module.bn = Identity()
    return fused
