"""EfficientViT variants as data.

The numbers are the ones of the official ``build.py`` (Cream repository) and of timm's
``efficientvit_msra``: every published model uses patch size 16, key dim 16 and windows of 7.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

DownOp = tuple[str, int]
IMPLS = ("auto", "standard", "cpu")  # cga_jax.ops' switch (ops re-exports this tuple)


def head_kernels(kernels: int | Sequence[int], num_heads: int) -> tuple[int, ...]:
    """One odd depthwise kernel size per attention head.

    An int (or a one-element sequence) is repeated for every head; a longer sequence is cut to
    ``num_heads`` (the published configs list 4 sizes for 2-4 heads). A sequence with more than one
    but fewer than ``num_heads`` entries is ambiguous and raises, as does an even or non-positive
    size.
    """
    if isinstance(kernels, int):
        kernels = (kernels,)
    kernels = tuple(int(k) for k in kernels)
    if len(kernels) == 1:
        kernels = kernels * num_heads
    if len(kernels) < num_heads:
        raise ValueError(
            f"kernels={kernels} gives {len(kernels)} sizes for {num_heads} heads; give one per "
            "head (or a single int for all)"
        )
    if any(k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(f"kernels must be odd positive ints, got {kernels}")
    return kernels[:num_heads]


@dataclasses.dataclass(frozen=True)
class EfficientViTConfig:
    """Hyper-parameters of one EfficientViT model.

    Attributes:
      embed_dim: channels of each stage.
      key_dim: query/key channels per head, per stage.
      depth: EfficientViT blocks per stage.
      num_heads: attention heads per stage; ``embed_dim[i]`` must divide by it.
      window_size: local-window side per stage.
      kernels: depthwise kernel size on q, per head (head ``h`` uses ``kernels[h]``).
      down_ops: per stage, ``("subsample", 2)`` for a downsample at the stage's start, or ``("", 1)``.
      img_size: the training resolution; ``min(img_size)`` sets the attention window resolution.
      patch_size: the stem's stride (always 16: four stride-2 convolutions).
      in_chans: input channels.
      num_classes: classifier outputs (0: no classifier, ``__call__`` returns pooled features).
      distillation: add the DeiT distillation head (its eval output is the mean of both heads).
      drop_rate: dropout before the classifier.
      drop_path_rate: stochastic depth on the residual branches (0 in the official recipe).
      impl: implementation of the primitives (:mod:`cga_jax.ops`): ``"auto"`` (XLA-CPU kernels
        when lowered for CPU, standard XLA ops elsewhere), ``"standard"`` or ``"cpu"``. Not part
        of the architecture: weights load the same way whatever it is.
    """

    embed_dim: tuple[int, ...] = (64, 128, 192)
    key_dim: tuple[int, ...] = (16, 16, 16)
    depth: tuple[int, ...] = (1, 2, 3)
    num_heads: tuple[int, ...] = (4, 4, 4)
    window_size: tuple[int, ...] = (7, 7, 7)
    kernels: tuple[int, ...] = (5, 5, 5, 5)
    down_ops: tuple[DownOp, ...] = (("", 1), ("subsample", 2), ("subsample", 2))
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    distillation: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    impl: str = "auto"

    def __post_init__(self) -> None:
        # Accept lists (e.g. from a JSON file or ml_collections) but store tuples: the config is
        # hashable and usable as a static argument.
        for name in ("embed_dim", "key_dim", "depth", "num_heads", "window_size", "kernels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(
            self, "down_ops", tuple((str(op[0]), int(op[1])) for op in self.down_ops)
        )
        if not isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", tuple(int(v) for v in self.img_size))
        self.validate()

    def validate(self) -> None:
        n = len(self.embed_dim)
        for name in ("key_dim", "depth", "num_heads", "window_size", "down_ops"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"EfficientViTConfig.{name} has {len(getattr(self, name))} entries but "
                    f"embed_dim has {n}: give one value per stage"
                )
        for i, (ed, nh) in enumerate(zip(self.embed_dim, self.num_heads, strict=False)):
            if nh < 1 or ed % nh:
                raise ValueError(
                    f"stage {i}: embed_dim={ed} is not divisible by num_heads={nh}; cascaded group "
                    "attention gives every head an equal channel split"
                )
            try:
                head_kernels(self.kernels, nh)
            except ValueError as e:
                raise ValueError(f"stage {i} ({nh} heads): {e}") from None
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.patch_size != 16:
            raise ValueError(f"patch_size must be 16 (4 stride-2 convs), got {self.patch_size}")
        if self.down_ops[0][0] == "subsample":
            raise ValueError("the first stage cannot subsample (the stem already has stride 16)")
        if self.embed_dim[0] % 8:
            raise ValueError(f"embed_dim[0]={self.embed_dim[0]} must be divisible by 8 (the stem)")

    @property
    def img_hw(self) -> tuple[int, int]:
        if isinstance(self.img_size, int):
            return (self.img_size, self.img_size)
        return self.img_size  # type: ignore[return-value]

    @property
    def attn_ratio(self) -> tuple[float, ...]:
        return tuple(
            ed / (kd * nh)
            for ed, kd, nh in zip(self.embed_dim, self.key_dim, self.num_heads, strict=False)
        )

    def stage_resolutions(self) -> tuple[int, ...]:
        """Feature-map side of each stage at ``min(img_size)`` (e.g. 14, 7, 4 at 224): what
        sets the stages' attention windows."""
        res = min(self.img_hw) // self.patch_size
        if res < 1:
            raise ValueError(
                f"img_size={self.img_size} is smaller than one patch ({self.patch_size})"
            )
        out = []
        for op, stride in self.down_ops:
            if op == "subsample":
                res = (res - 1) // stride + 1
            out.append(res)
        return tuple(out)

    def replace(self, **kwargs) -> EfficientViTConfig:
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["down_ops"] = [list(op) for op in self.down_ops]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EfficientViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EfficientViTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _variant(
    embed_dim: Sequence[int],
    depth: Sequence[int],
    num_heads: Sequence[int],
    kernels: Sequence[int],
) -> EfficientViTConfig:
    return EfficientViTConfig(
        embed_dim=tuple(embed_dim),
        depth=tuple(depth),
        num_heads=tuple(num_heads),
        kernels=tuple(kernels),
    )


# name -> config; params/FLOPs/top-1 (paper, ImageNet-1k 224) in the README.
VARIANTS: dict[str, EfficientViTConfig] = {
    "efficientvit_m0": _variant((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "efficientvit_m1": _variant((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "efficientvit_m2": _variant((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "efficientvit_m3": _variant((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "efficientvit_m4": _variant((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "efficientvit_m5": _variant((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}
