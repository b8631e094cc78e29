"""BatchNorm folding for the cga_jax model, local to the benchmark.

:func:`fold_batchnorm` returns a copy of an :class:`cga_jax.EfficientViT` in which every
``ConvNorm`` is a convolution followed by a per-channel bias add (the BN scale folded into the
kernel) and every ``NormLinear`` is a single ``Linear`` - the same rewrite as the official
``replace_batchnorm`` / timm's ``ConvNorm.fuse()``. ``cga_jax/`` is not touched: the BN submodules
of the copy are swapped for the two small modules below.

:func:`get_folder` picks the implementation: ``cga_jax.fuse_bn`` once the library has it, this
module's otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.layers import BatchNorm, ConvNorm, NormLinear

FoldFn = Callable[[nnx.Module], nnx.Module]


class BiasAdd(nnx.Module):
    """``x + bias`` over the last axis: what remains of a BatchNorm folded into its conv."""

    def __init__(self, bias: np.ndarray):
        self.bias = nnx.Param(jnp.asarray(bias, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.bias[...].astype(x.dtype)


class Identity(nnx.Module):
    """What remains of the head's BatchNorm1d once folded into the following Linear."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _bn_affine(bn: BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BN as ``x * inv + shift`` (float64)."""
    scale = np.asarray(bn.scale[...], np.float64)
    var = np.asarray(bn.var[...], np.float64)
    mean = np.asarray(bn.mean[...], np.float64)
    inv = scale / np.sqrt(var + bn.epsilon)
    shift = np.asarray(bn.bias[...], np.float64) - mean * inv
    return inv, shift


def _fold_conv_norm(cn: ConvNorm) -> None:
    inv, shift = _bn_affine(cn.bn)
    kernel = np.asarray(cn.conv.kernel[...], np.float64)  # (kh, kw, in // groups, out)
    cn.conv.kernel[...] = jnp.asarray(kernel * inv, jnp.float32)
    if cn.conv.bias is not None:  # never in EfficientViT, but cheap to get right
        shift = shift + np.asarray(cn.conv.bias[...], np.float64) * inv
        cn.conv.bias = nnx.data(None)
    cn.bn = BiasAdd(shift)


def _fold_norm_linear(nl: NormLinear) -> None:
    inv, shift = _bn_affine(nl.bn)
    kernel = np.asarray(nl.linear.kernel[...], np.float64)  # (in, out)
    bias = np.asarray(nl.linear.bias[...], np.float64)
    nl.linear.kernel[...] = jnp.asarray(inv[:, None] * kernel, jnp.float32)
    nl.linear.bias[...] = jnp.asarray(shift @ kernel + bias, jnp.float32)
    nl.bn = Identity()


def fold_batchnorm(model: nnx.Module) -> nnx.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded away; ``model`` is unchanged.

    The copy computes the same eval logits (up to float32 rounding) and is for inference only:
    it has no BN statistics left to train.
    """
    folded = nnx.clone(model)
    folded.eval()
    targets = [m for _, m in nnx.iter_modules(folded) if isinstance(m, ConvNorm | NormLinear)]
    for m in targets:
        if isinstance(m, ConvNorm):
            _fold_conv_norm(m)
        else:
            _fold_norm_linear(m)
    leftover = [p for p, m in nnx.iter_modules(folded) if isinstance(m, BatchNorm)]
    if leftover:
        raise RuntimeError(f"BatchNorm outside ConvNorm/NormLinear, not folded: {leftover[:5]}")
    return folded


def _library_fold(model: nnx.Module) -> nnx.Module:
    import cga_jax

    copy = nnx.clone(model)
    copy.eval()
    out = cga_jax.fuse_bn(copy)  # type: ignore[attr-defined]
    return copy if out is None else out


def get_folder(impl: str = "auto") -> tuple[str, FoldFn]:
    """``impl``: ``'auto'`` (``cga_jax.fuse_bn`` if the library has it, else ``'bench'``),
    ``'bench'`` (:func:`fold_batchnorm`) or ``'cga_jax'``. Returns (name used, function)."""
    import cga_jax

    has_lib = hasattr(cga_jax, "fuse_bn")
    if impl == "auto":
        impl = "cga_jax" if has_lib else "bench"
    if impl == "cga_jax":
        if not has_lib:
            raise RuntimeError("--fused-impl cga_jax: this cga_jax has no fuse_bn")
        return "cga_jax.fuse_bn", _library_fold
    if impl == "bench":
        return "bench.fold.fold_batchnorm", fold_batchnorm
    raise ValueError(f"unknown fused implementation {impl!r} (auto, bench, cga_jax)")
