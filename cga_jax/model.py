"""EfficientViT (MSRA): stem, sandwich blocks, subsample blocks, stages and head. NHWC."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cga_jax.attention import LocalWindowAttention
from cga_jax.config import EfficientViTConfig
from cga_jax.features import feature_take_indices
from cga_jax.layers import ConvMlp, ConvNorm, NormLinear, ResidualDrop, SqueezeExcite
from cga_jax.ops import use_impl


class PatchEmbedding(nnx.Module):
    """Four 3x3 stride-2 conv+BN (ReLU between): (B, H, W, 3) -> (B, H/16, W/16, dim)."""

    def __init__(self, in_chans: int, dim: int, *, rngs: nnx.Rngs):
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1, rngs=rngs)
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1, rngs=rngs)
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1, rngs=rngs)
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1, rngs=rngs)

    def __call__(self, x: jax.Array, taps: list | None = None) -> jax.Array:
        """``taps``, if given, receives the stride-8 map (after conv3's ReLU)."""
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = jax.nn.relu(self.conv3(x))
        if taps is not None:
            taps.append(x)
        return self.conv4(x)


class PatchMerging(nnx.Module):
    """1x1 expand (x4) -> 3x3 stride-2 depthwise -> SE -> 1x1 project.

    (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim).
    """

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
        hid = int(dim * 4)
        self.conv1 = ConvNorm(dim, hid, 1, 1, 0, rngs=rngs)
        self.conv2 = ConvNorm(hid, hid, 3, 2, 1, groups=hid, rngs=rngs)
        self.se = SqueezeExcite(hid, 0.25, rngs=rngs)
        self.conv3 = ConvNorm(hid, out_dim, 1, 1, 0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.conv3(self.se(x))


def _dw_ffn(dim: int, drop: float, bn_weight_init: float, rngs: nnx.Rngs) -> nnx.List:
    """Residual depthwise 3x3 conv then residual FFN (the "res1"/"res2" halves of a subsample)."""
    return nnx.List(
        [
            ResidualDrop(
                ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init, rngs=rngs),
                drop,
                rngs=rngs,
            ),
            ResidualDrop(ConvMlp(dim, dim * 2, rngs=rngs), drop, rngs=rngs),
        ]
    )


class Subsample(nnx.Module):
    """Between stages: residual dw+FFN, PatchMerging, residual dw+FFN (timm ``downsample``)."""

    def __init__(self, in_dim: int, out_dim: int, drop: float = 0.0, *, rngs: nnx.Rngs):
        self.res1 = _dw_ffn(in_dim, drop, 1.0, rngs)
        self.patchmerge = PatchMerging(in_dim, out_dim, rngs=rngs)
        self.res2 = _dw_ffn(out_dim, drop, 1.0, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.res1:
            x = layer(x)
        x = self.patchmerge(x)
        for layer in self.res2:
            x = layer(x)
        return x


class EfficientVitBlock(nnx.Module):
    """The sandwich block: dw-conv, FFN, window attention, dw-conv, FFN, each residual.

    (B, H, W, dim) -> (B, H, W, dim).
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
        drop: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        def dw() -> ResidualDrop:
            conv = ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0, rngs=rngs)
            return ResidualDrop(conv, drop, rngs=rngs)

        self.dw0 = dw()
        self.ffn0 = ResidualDrop(ConvMlp(dim, dim * 2, rngs=rngs), drop, rngs=rngs)
        self.mixer = ResidualDrop(
            LocalWindowAttention(
                dim,
                key_dim,
                num_heads,
                resolution=resolution,
                window_resolution=window_resolution,
                kernels=kernels,
                rngs=rngs,
            ),
            drop,
            rngs=rngs,
        )
        self.dw1 = dw()
        self.ffn1 = ResidualDrop(ConvMlp(dim, dim * 2, rngs=rngs), drop, rngs=rngs)

    def set_input_size(self, resolution: int) -> None:
        """Nominal map side of this block (sets its attention window and bias table)."""
        self.mixer.m.set_input_size(resolution)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientVitStage(nnx.Module):
    """Optional subsample, then ``depth`` sandwich blocks.

    ``resolution`` is the stage's own map side (after its subsample), from
    :meth:`EfficientViTConfig.stage_resolutions`: it sets the blocks' attention windows.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        downsample: tuple[str, int],
        num_heads: int,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
        depth: int,
        drop: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        if downsample[0] == "subsample":
            if downsample[1] != 2:
                raise ValueError(f"only stride-2 subsampling exists, got {downsample}")
            self.stride = 2
            self.downsample = Subsample(in_dim, out_dim, drop, rngs=rngs)
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without subsample keeps its width ({in_dim}->{out_dim})")
            self.stride = 1
            self.downsample = nnx.data(None)
        self.resolution = resolution
        self.blocks = nnx.List(
            [
                EfficientVitBlock(
                    out_dim,
                    key_dim,
                    num_heads,
                    self.resolution,
                    window_resolution,
                    kernels,
                    drop,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )

    def set_input_size(self, resolution: int) -> None:
        """``resolution``: the stage's own map side (after its subsample)."""
        self.resolution = resolution
        for block in self.blocks:
            block.set_input_size(self.resolution)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class EfficientViT(nnx.Module):
    """EfficientViT M0-M5 (and any custom :class:`EfficientViTConfig`).

    ``model(x)``: x (B, H, W, in_chans) float -> logits (B, num_classes). Any H, W works (the
    attention pads to whole windows); ``cfg.img_size`` only sets the window resolution, as in timm.
    ``model.eval()`` uses BN running statistics; ``model.train()`` uses batch statistics and
    updates them. With ``distillation=True``, ``average_heads`` (set by ``eval()``, cleared by
    ``train()``) makes the output the mean of both heads; otherwise it is the pair
    ``(logits, logits_dist)``, as in the official code. ``cfg.impl`` picks the implementation of
    the primitives (:mod:`cga_jax.ops`).
    """

    def __init__(self, cfg: EfficientViTConfig, *, rngs: nnx.Rngs):
        with use_impl(cfg.impl):
            self._build(cfg, rngs)

    def _build(self, cfg: EfficientViTConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.patch_embed = PatchEmbedding(cfg.in_chans, cfg.embed_dim[0], rngs=rngs)
        stages = []
        prev = cfg.embed_dim[0]
        for ed, kd, dp, nh, ws, op, resolution in zip(
            cfg.embed_dim,
            cfg.key_dim,
            cfg.depth,
            cfg.num_heads,
            cfg.window_size,
            cfg.down_ops,
            cfg.stage_resolutions(),
            strict=True,
        ):
            stage = EfficientVitStage(
                prev,
                ed,
                kd,
                op,
                nh,
                resolution,
                ws,
                cfg.kernels,
                dp,
                cfg.drop_path_rate,
                rngs=rngs,
            )
            prev = ed
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.num_features = cfg.embed_dim[-1]
        self.head = self._make_head(cfg.num_classes, rngs)
        self.head_dist = (
            self._make_head(cfg.num_classes, rngs) if cfg.distillation else nnx.data(None)
        )
        self.average_heads = False  # distillation: mean of both heads (set by eval())

    def train(self, **attributes) -> None:
        """Training mode: BN batch statistics, dropout on, distillation heads returned apart."""
        super().train(**attributes)
        self.average_heads = False

    def eval(self, **attributes) -> None:
        """Eval mode: BN running statistics, no dropout, distillation heads averaged."""
        super().eval(**attributes)
        self.average_heads = True

    def _make_head(self, num_classes: int, rngs: nnx.Rngs):
        if num_classes <= 0:
            return nnx.data(None)
        return NormLinear(self.num_features, num_classes, drop=self.cfg.drop_rate, rngs=rngs)

    # ---- timm-style API -------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict]:
        """Per stage: channels, stride w.r.t. the input, module path (as timm)."""
        info, stride = [], self.cfg.patch_size
        for i, stage in enumerate(self.stages):
            stride *= stage.stride
            info.append(dict(num_chs=self.cfg.embed_dim[i], reduction=stride, module=f"stages.{i}"))
        return info

    @property
    def stem_feature_info(self) -> dict:
        """The stride-8 tap: ``patch_embed.conv3`` after its ReLU (timm: ``patch_embed.relu3``)."""
        return dict(num_chs=self.cfg.embed_dim[0] // 2, reduction=8, module="patch_embed.relu3")

    def feature_info_with_stem(self) -> list[dict]:
        """``[stem_feature_info, *feature_info]``: the maps of ``include_stem=True``."""
        return [self.stem_feature_info, *self.feature_info]

    def forward_features(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in_chans) -> last stage map (B, H/64, W/64, embed_dim[-1]) at 224."""
        x = self.patch_embed(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_intermediates(
        self,
        x: jax.Array,
        indices: int | Sequence[int] | None = None,
        *,
        include_stem: bool = False,
        stop_early: bool = False,
        intermediates_only: bool = False,
        norm: bool = False,
        output_fmt: str = "NHWC",
    ):
        """Stage outputs, as timm's ``forward_intermediates`` (but NHWC).

        Args:
          x: (B, H, W, in_chans).
          indices: which stages (0..n-1, stride 16/32/64 for the published models): ``None`` all,
            an int ``k`` the last ``k``, a sequence those indices (negative from the end). Maps
            come back in stage order, each once, as timm does.
          include_stem: put the stride-8 map (``patch_embed`` conv3 after ReLU, channels
            ``embed_dim[0] // 2``) first in the list, so stem + ``indices=[0, 1]`` is a YOLO-style
            P3/P4/P5 pyramid at strides 8/16/32. Its info is :attr:`stem_feature_info`.
          stop_early: skip the stages after the last requested one (the returned final map is
            then that stage's output).
          intermediates_only: return only the list.
          norm: accepted for timm compatibility; EfficientViT has no final norm (no-op).
          output_fmt: only ``"NHWC"``.

        Returns:
          ``[maps]`` if ``intermediates_only`` else ``(final_map, [maps])``; map ``i`` is
          (B, H_i, W_i, C_i) with ``C_i`` and the stride in :attr:`feature_info`.
        """
        del norm
        if output_fmt != "NHWC":
            raise ValueError(
                f"output_fmt must be 'NHWC' (cga_jax is channels-last), got {output_fmt!r}"
            )
        take, max_index = feature_take_indices(len(self.stages), indices)
        stem: list[jax.Array] = []
        x = self.patch_embed(x, taps=stem if include_stem else None)
        intermediates = list(stem)
        last = max_index if stop_early else len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i > last:
                break
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_pyramid(self, x: jax.Array) -> list[jax.Array]:
        """P3/P4/P5 for a detection neck: maps at strides 8, 16, 32 (the stem tap, stages 0, 1).

        (B, H, W, in_chans) -> [(B, H/8, W/8, embed_dim[0]//2), (B, H/16, W/16, embed_dim[0]),
        (B, H/32, W/32, embed_dim[1])] (sides rounded up); the last stage is not run. Channels:
        ``[i["num_chs"] for i in model.feature_info_with_stem()[:3]]``.
        """
        if len(self.stages) < 2:
            raise ValueError("forward_pyramid needs at least two stages")
        return self.forward_intermediates(
            x, indices=[0, 1], include_stem=True, stop_early=True, intermediates_only=True
        )

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution the model is built for, as timm's ``set_input_size``.

        ``min(img_size) // 16`` and the stages' subsampling give each stage's nominal side; every
        window attention whose effective window ``min(window, side)`` changes gets its bias table
        resized (bicubic, antialiased, as timm) from its current one. Any input size already runs
        without this; it only changes the windows. Call outside ``jit`` and before building an
        optimizer (the resized tables are new ``nnx.Param`` objects).
        """
        cfg = self.cfg.replace(img_size=img_size)
        for stage, resolution in zip(self.stages, cfg.stage_resolutions(), strict=True):
            stage.set_input_size(resolution)
        self.cfg = cfg

    def forward_head(self, x: jax.Array, pre_logits: bool = False):
        """(B, h, w, C) map -> pooled (B, C) if ``pre_logits`` else logits (B, num_classes)."""
        x = jnp.mean(x, axis=(1, 2))
        if pre_logits or self.head is None:
            return x
        logits = self.head(x)
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x)
        if self.average_heads:
            return (logits + logits_dist) / 2
        return logits, logits_dist

    def __call__(self, x: jax.Array):
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> tuple[str, ...]:
        """Leaf names excluded from weight decay by the official recipe."""
        return ("attention_biases",)
