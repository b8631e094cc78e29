"""Cascaded Group Attention and local-window attention, NHWC."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.config import head_kernels
from cga_jax.layers import ConvNorm, ReLU
from cga_jax.resize import resize_attention_biases


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


def apply_in_windows(fn: Callable[[jax.Array], jax.Array], x: jax.Array, window: int) -> jax.Array:
    """Apply ``fn`` to every ``window x window`` tile of a map of any size.

    x: (B, H, W, C). The map is zero-padded at the bottom/right to whole windows (a map smaller
    than the window becomes one padded window), tiled into (B * nH * nW, window, window, C), passed
    through ``fn`` in one batch, reassembled and cropped back to (B, H, W, C'). This is timm's
    ``LocalWindowAttention`` partition, so padded tokens take part in attention exactly as there.
    """
    b, h, w, c = x.shape
    if h == window and w == window:
        return fn(x)
    pad_b, pad_r = (-h) % window, (-w) % window
    if pad_b or pad_r:
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // window, pw // window
    # (B, nh*ws, nw*ws, C) -> (B*nh*nw, ws, ws, C)
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    y = fn(x.reshape(b * nh * nw, window, window, c))
    co = y.shape[-1]
    y = y.reshape(b, nh, nw, window, window, co).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, ph, pw, co)[:, :h, :w, :]


def _check_map(x: jax.Array, dim: int, who: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{who} expects an NHWC map (B, H, W, {dim}), got shape {x.shape}")
    if x.shape[-1] != dim:
        raise ValueError(
            f"{who} was built for dim={dim} channels but got {x.shape[-1]} (input shape "
            f"{x.shape}, NHWC: channels last)"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{who} got an empty map of shape {x.shape}")


class CascadedGroupAttention(nnx.Module):
    """Cascaded Group Attention (EfficientViT, Liu et al. 2023) over one window.

    The input's channels are split into ``num_heads`` equal groups. Head ``h`` sees group ``h``
    plus the output of head ``h-1``; it projects that to q, k, v with a 1x1 conv+BN, runs a
    depthwise conv+BN of size ``kernels[h]`` on q, and attends with
    ``softmax(q k^T * key_dim**-0.5 + bias_h)``, where ``bias_h`` comes from a learned table of
    relative offsets (``attention_biases``: (num_heads, resolution**2)). The heads' outputs are
    concatenated, passed through ReLU and a 1x1 conv+BN back to ``dim`` channels.

    Like timm's ``CascadedGroupAttention`` it attends one ``resolution x resolution`` window:
    the bias table is sized by it. For maps of any other size use :class:`LocalWindowAttention`,
    which tiles the map into such windows.

    Args:
      dim: input/output channels; must be divisible by ``num_heads``.
      key_dim: channels of q and k per head.
      num_heads: number of heads.
      attn_ratio: value channels are ``int(attn_ratio * key_dim)``; the cascade needs them equal to
        ``dim // num_heads`` (the default ``None`` picks that; anything else raises).
      resolution: the window side (and the bias table's grid side).
      kernels: depthwise kernel size on q per head (an int for all heads).

    x: (B, resolution, resolution, dim) -> same shape.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int = 16,
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
        if key_dim < 1:
            raise ValueError(f"key_dim must be >= 1, got {key_dim}")
        split = dim // num_heads
        if attn_ratio is None:
            attn_ratio = split / key_dim
        val_dim = int(attn_ratio * key_dim)
        if val_dim != split:
            raise ValueError(
                f"CascadedGroupAttention: value dim int(attn_ratio*key_dim)={val_dim} must equal "
                f"dim/num_heads={split}, since each head's output is added to the next head's "
                f"input split (use attn_ratio={split / key_dim:g}, or None)"
            )
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = val_dim
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.kernels = head_kernels(kernels, num_heads)
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

    def set_resolution(self, resolution: int) -> None:
        """Change the window side, resizing the bias table (bicubic, as timm's ``set_resolution``).

        Call it outside ``jit`` and before building an optimizer over the model: the table is
        replaced by a new ``nnx.Param`` of shape (num_heads, resolution**2).
        """
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if resolution == self.resolution:
            return
        old = self.attention_biases[...]
        new = resize_attention_biases(np.asarray(old, np.float32), resolution * resolution)
        self.attention_biases = nnx.Param(jnp.asarray(new, dtype=old.dtype))
        self.resolution = resolution

    def _head(self, i: int, feat: jax.Array, bias: jax.Array) -> jax.Array:
        """Head ``i``: feat (B, r, r, dim/heads), bias (N, N) -> (B, r, r, val_dim)."""
        b, h, w, _ = feat.shape
        n = h * w
        kd, vd = self.key_dim, self.val_dim
        qkv = self.qkvs[i](feat)  # (B, r, r, 2kd + vd)
        q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
        q = self.dws[i](q)
        q = q.reshape(b, n, kd) * self.scale
        k = k.reshape(b, n, kd)
        v = v.reshape(b, n, vd)
        logits = jnp.einsum("bnc,bmc->bnm", q, k).astype(bias.dtype) + bias
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bnm,bmc->bnc", attn, v).reshape(b, h, w, vd)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, resolution, resolution, dim) -> (B, resolution, resolution, dim)."""
        _check_map(x, self.dim, f"CascadedGroupAttention(dim={self.dim}, heads={self.num_heads})")
        r = self.resolution
        if x.shape[1:3] != (r, r):
            raise ValueError(
                f"CascadedGroupAttention(resolution={r}) attends one {r}x{r} window, got a "
                f"{x.shape[1]}x{x.shape[2]} map; use LocalWindowAttention(window_resolution={r}) "
                "for maps of other sizes"
            )
        soft_dtype = jnp.promote_types(x.dtype, jnp.float32)  # softmax in >= f32 (bf16 inputs)
        bias = self.bias().astype(soft_dtype)
        splits = jnp.split(x, self.num_heads, axis=-1)
        outs = []
        feat = splits[0]
        for i in range(self.num_heads):  # the cascade: head i sees split i + head i-1's output
            if i > 0:
                feat = feat + splits[i]
            feat = self._head(i, feat, bias[i])
            outs.append(feat)
        y = jnp.concatenate(outs, axis=-1)
        for layer in self.proj:
            y = layer(y)
        return y


class LocalWindowAttention(nnx.Module):
    """Cascaded group attention inside non-overlapping windows, for maps of any size.

    The effective window is ``min(window_resolution, resolution)``, where ``resolution`` is the
    map side the layer is built for (the model passes its stage's side, as timm does, so a stage
    whose map is smaller than 7 gets a smaller window and bias table). For use outside the model,
    leave ``resolution=None``: the window is ``window_resolution``. A map of exactly one window is
    attended directly; otherwise it is zero-padded at the bottom/right to whole windows,
    partitioned, attended (all windows batched), reassembled and cropped
    (:func:`apply_in_windows`). Maps smaller than the window are padded to one window: the bias
    table follows the window, never the map.

    Args:
      dim: input/output channels; must be divisible by ``num_heads``.
      key_dim: q/k channels per head.
      num_heads: heads (each gets ``dim // num_heads`` channels, which is also its value dim).
      attn_ratio: value dim / key dim; ``None`` (default) picks the only valid one.
      resolution: nominal map side, caps the window (``None``: no cap).
      window_resolution: window side.
      kernels: odd depthwise kernel size on q, one per head or one int for all.

    x: (B, H, W, dim) -> (B, H, W, dim), any H, W >= 1.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int = 16,
        num_heads: int = 8,
        attn_ratio: float | None = None,
        resolution: int | None = None,
        window_resolution: int = 7,
        kernels: int | Sequence[int] = 5,
        *,
        rngs: nnx.Rngs,
    ):
        if window_resolution < 1:
            raise ValueError(f"window_resolution must be >= 1, got {window_resolution}")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be >= 1 (or None), got {resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(
            dim,
            key_dim,
            num_heads,
            attn_ratio=attn_ratio,
            resolution=self._window(resolution),
            kernels=kernels,
            rngs=rngs,
        )

    def _window(self, resolution: int | None) -> int:
        if resolution is None:
            return self.window_resolution
        return min(self.window_resolution, resolution)

    def set_input_size(self, resolution: int | None) -> None:
        """Set the nominal map side; the window (and bias table) follow as at construction."""
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be >= 1 (or None), got {resolution}")
        self.resolution = resolution
        self.attn.set_resolution(self._window(resolution))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, dim) -> (B, H, W, dim)."""
        _check_map(x, self.dim, f"LocalWindowAttention(dim={self.dim}, heads={self.num_heads})")
        return apply_in_windows(self.attn, x, self.attn.resolution)
