"""Cascaded Group Attention and local-window attention, NHWC."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.layers import ConvNorm, ReLU


@functools.cache
def attention_bias_index(resolution: int) -> np.ndarray:
    """Static index into the bias table: ``(N, N)`` int32, ``N = resolution**2``.

    Tokens ``p=(y1, x1)`` and ``q=(y2, x2)`` of a ``resolution x resolution`` window share the bias
    of their offset ``(|y1-y2|, |x1-x2|)``, stored at ``|y1-y2| * resolution + |x1-x2|`` - the order
    in which the official code enumerates offsets.
    """
    r = np.arange(resolution)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    idx = np.abs(y[:, None] - y[None, :]) * resolution + np.abs(x[:, None] - x[None, :])
    idx = idx.astype(np.int32)
    idx.setflags(write=False)
    return idx


def broadcast_kernels(kernels: int | Sequence[int], num_heads: int) -> tuple[int, ...]:
    """One odd kernel size per head: an int is repeated; a longer sequence is cut to the heads."""
    if isinstance(kernels, int):
        kernels = (kernels,) * num_heads
    kernels = tuple(int(k) for k in kernels)
    if len(kernels) < num_heads:
        raise ValueError(
            f"kernels={kernels} gives {len(kernels)} sizes for {num_heads} heads; give one per "
            "head (or a single int for all)"
        )
    kernels = kernels[:num_heads]
    if any(k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(f"kernels must be odd positive ints, got {kernels}")
    return kernels


class CascadedGroupAttention(nnx.Module):
    """Cascaded Group Attention (EfficientViT, Liu et al. 2023) on one window.

    The input's channels are split into ``num_heads`` equal groups. Head ``h`` sees group ``h``
    plus the output of head ``h-1``; it projects that to q, k, v with a 1x1 conv+BN, runs a
    depthwise conv+BN of size ``kernels[h]`` on q, and attends with
    ``softmax(q k^T * key_dim**-0.5 + bias_h)``, where ``bias_h`` comes from a learned table of
    relative offsets (``attention_biases``: (num_heads, resolution**2)). The heads' outputs are
    concatenated, passed through ReLU and a 1x1 conv+BN back to ``dim`` channels.

    Args:
      dim: input/output channels; must be divisible by ``num_heads``.
      key_dim: channels of q and k per head.
      num_heads: number of heads.
      attn_ratio: value channels are ``int(attn_ratio * key_dim)``; the cascade needs them equal to
        ``dim // num_heads`` (the default ``None`` picks that).
      resolution: the window side: inputs must be (B, resolution, resolution, dim).
      kernels: depthwise kernel size on q per head (an int for all heads).

    x: (B, resolution, resolution, dim) -> (B, resolution, resolution, dim). All windows of all
    images are batched along B; only the cascade over heads is sequential.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float | None = None,
        resolution: int = 14,
        kernels: int | Sequence[int] = 5,
        *,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"CascadedGroupAttention: dim={dim} channels cannot be split into "
                f"num_heads={num_heads} equal groups; choose num_heads dividing {dim}"
            )
        split = dim // num_heads
        if attn_ratio is None:
            attn_ratio = split / key_dim
        val_dim = int(attn_ratio * key_dim)
        if val_dim != split:
            raise ValueError(
                f"CascadedGroupAttention: value dim int(attn_ratio*key_dim)={val_dim} must equal "
                f"dim/num_heads={split}, since each head's output is added to the next head's "
                f"input split (use attn_ratio={split / key_dim:g})"
            )
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = val_dim
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.kernels = broadcast_kernels(kernels, num_heads)
        self.qkvs = nnx.List(
            [ConvNorm(split, 2 * key_dim + val_dim, rngs=rngs) for _ in range(num_heads)]
        )
        self.dws = nnx.List(
            [
                ConvNorm(key_dim, key_dim, k, 1, k // 2, groups=key_dim, rngs=rngs)
                for k in self.kernels
            ]
        )
        # timm/official: proj = Sequential(ReLU, Conv2d_BN) -> the conv is ``proj.1``.
        self.proj = nnx.List(
            [ReLU(), ConvNorm(val_dim * num_heads, dim, bn_weight_init=0.0, rngs=rngs)]
        )
        self.attention_biases = nnx.Param(jnp.zeros((num_heads, resolution * resolution)))

    def bias(self) -> jax.Array:
        """The gathered bias, (num_heads, N, N) with N = resolution**2."""
        return self.attention_biases[...][:, attention_bias_index(self.resolution)]

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if (h, w) != (self.resolution, self.resolution) or c != self.dim:
            raise ValueError(
                f"CascadedGroupAttention(dim={self.dim}, resolution={self.resolution}) got input "
                f"of shape {x.shape}; expected (B, {self.resolution}, {self.resolution}, "
                f"{self.dim}). Use LocalWindowAttention for maps of any size."
            )
        n = h * w
        kd, vd = self.key_dim, self.val_dim
        splits = jnp.split(x, self.num_heads, axis=-1)
        soft_dtype = jnp.promote_types(x.dtype, jnp.float32)  # softmax in >= f32 (bf16 inputs)
        bias = self.bias().astype(soft_dtype)
        outs = []
        feat = splits[0]
        for i in range(self.num_heads):
            if i > 0:
                feat = feat + splits[i]
            qkv = self.qkvs[i](feat)  # (B, h, w, 2kd + vd)
            q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
            q = self.dws[i](q)
            q = q.reshape(b, n, kd) * self.scale
            k = k.reshape(b, n, kd)
            v = v.reshape(b, n, vd)
            logits = jnp.einsum("bnc,bmc->bnm", q, k).astype(soft_dtype) + bias[i]
            attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            feat = jnp.einsum("bnm,bmc->bnc", attn, v).reshape(b, h, w, vd)
            outs.append(feat)
        y = jnp.concatenate(outs, axis=-1)
        for layer in self.proj:
            y = layer(y)
        return y


class LocalWindowAttention(nnx.Module):
    """Cascaded group attention inside non-overlapping windows, for maps of any size.

    The effective window is ``min(window_resolution, resolution)`` (``resolution``: the map side
    the model is built for). A map of exactly one window is attended directly; otherwise it is
    zero-padded at the bottom/right to a multiple of the window, partitioned, attended (all
    windows batched), reassembled and cropped. Maps smaller than the window are padded to one
    window, so the bias table always follows the window, never the map.

    x: (B, H, W, dim) -> (B, H, W, dim), any H, W >= 1.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float | None = None,
        resolution: int = 14,
        window_resolution: int = 7,
        kernels: int | Sequence[int] = 5,
        *,
        rngs: nnx.Rngs,
    ):
        if window_resolution < 1:
            raise ValueError(f"window_resolution must be >= 1, got {window_resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(
            dim,
            key_dim,
            num_heads,
            attn_ratio=attn_ratio,
            resolution=min(window_resolution, resolution),
            kernels=kernels,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c != self.dim:
            raise ValueError(
                f"LocalWindowAttention(dim={self.dim}) got {c} channels (input shape {x.shape})"
            )
        ws = self.attn.resolution
        if h == ws and w == ws:
            return self.attn(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        # (B, nh*ws, nw*ws, C) -> (B*nh*nw, ws, ws, C)
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.attn(x.reshape(b * nh * nw, ws, ws, c))
        x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        return x[:, :h, :w, :]
