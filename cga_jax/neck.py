"""A YOLOv8-style neck block with Cascaded Group Attention: ``C2fCGA``. NHWC.

Detection users add CGA to a CSP/C2f block of their neck: the block's output goes through local
window attention as a residual. The attention's output projection starts with a zero BN scale
(as in EfficientViT), so a freshly inserted block first behaves exactly like the plain C2f.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cga_jax.attention import LocalWindowAttention
from cga_jax.layers import ConvNorm


class ConvBNAct(nnx.Module):
    """Conv (no bias) -> BN -> SiLU, "same" padding (YOLOv8's ``Conv``).

    (B, H, W, in_chs) -> (B, ceil(H / stride), ceil(W / stride), out_chs); odd ``kernel_size``.
    """

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, *, rngs: nnx.Rngs
    ):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = ConvNorm(in_chs, out_chs, kernel_size, stride, kernel_size // 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.conv(x))


class Bottleneck(nnx.Module):
    """Two 3x3 ConvBNAct, plus the input when ``shortcut`` (YOLOv8's ``Bottleneck``, e=1).

    (B, H, W, chs) -> (B, H, W, chs).
    """

    def __init__(self, chs: int, shortcut: bool = True, *, rngs: nnx.Rngs):
        self.cv1 = ConvBNAct(chs, chs, 3, rngs=rngs)
        self.cv2 = ConvBNAct(chs, chs, 3, rngs=rngs)
        self.shortcut = shortcut

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C2fCGA(nnx.Module):
    """C2f block whose output passes through Cascaded Group Attention, residual.

    ``cv1`` (1x1) makes ``2c`` channels (``c = int(out_chs * expansion)``), split in two halves;
    ``n`` bottlenecks run on the last half in a chain; all ``2 + n`` pieces are concatenated and
    ``cv2`` (1x1) maps them to ``out_chs``. Then ``y + LocalWindowAttention(y)``: cascaded group
    attention in ``window x window`` windows, so any map size works (padding to whole windows).

    Args:
      in_chs, out_chs: channels in and out; ``out_chs`` must be divisible by ``num_heads``.
      n: bottlenecks.
      shortcut: residual inside the bottlenecks (YOLOv8 uses False in the neck).
      expansion: hidden width ratio of the C2f part.
      num_heads, key_dim, window, kernels: the attention (see :class:`LocalWindowAttention`);
        each head gets ``out_chs // num_heads`` channels.

    x: (B, H, W, in_chs) -> (B, H, W, out_chs), any H, W >= 1.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        n: int = 1,
        *,
        shortcut: bool = False,
        expansion: float = 0.5,
        num_heads: int = 4,
        key_dim: int = 16,
        window: int = 7,
        kernels: int | Sequence[int] = 5,
        rngs: nnx.Rngs,
    ):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if num_heads < 1 or out_chs % num_heads:
            raise ValueError(
                f"C2fCGA: out_chs={out_chs} cannot be split into num_heads={num_heads} equal "
                f"attention groups; choose num_heads dividing {out_chs}"
            )
        c = int(out_chs * expansion)
        if c < 1:
            raise ValueError(f"C2fCGA: hidden width int({out_chs}*{expansion}) must be >= 1")
        self.hidden = c
        self.cv1 = ConvBNAct(in_chs, 2 * c, 1, rngs=rngs)
        self.m = nnx.List([Bottleneck(c, shortcut, rngs=rngs) for _ in range(n)])
        self.cv2 = ConvBNAct((2 + n) * c, out_chs, 1, rngs=rngs)
        self.attn = LocalWindowAttention(
            out_chs, key_dim, num_heads, window_resolution=window, kernels=kernels, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        ys = list(jnp.split(self.cv1(x), 2, axis=-1))
        for block in self.m:
            ys.append(block(ys[-1]))
        y = self.cv2(jnp.concatenate(ys, axis=-1))
        return y + self.attn(y)


def upsample_to(x: jax.Array, like: jax.Array) -> jax.Array:
    """Nearest-neighbour resize of x (B, h, w, C) to like's (H, W): (B, H, W, C)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, like.shape[1], like.shape[2], c), method="nearest")
