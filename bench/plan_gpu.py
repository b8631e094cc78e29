"""The accelerator section (``--only gpu``): the official GPU protocol and the training step.

Inference: BN folded, 224x224, batch 2048 (halved until it fits), throughput; cga_jax (the
README path) in float32 and bfloat16 vs PyTorch (timm, BN fused, ``torch.jit.trace`` as the
official ``speed_test.py``) in float32 and under AMP (bfloat16, and float16 = the official
protocol's ``autocast()``). Training: one AdamW step at batch 256 with bfloat16 compute, cga_jax's
jitted step (donated state) vs PyTorch AMP eager. First calls (compilation) are reported for all.
"""

from __future__ import annotations

from typing import Any

from bench.cases import Case, Contestant, Section

PAPER_V100_M0_IMG_S = 27644.0  # EfficientViT paper, M0 throughput on a V100 (official protocol)
TARGET_RATIO = 1.2  # cga_jax bf16 vs PyTorch AMP, inference and training
INFER_BATCH = 2048
TRAIN_BATCH = 256
REPEAT_S = 1.0  # default seconds per timed repeat
# run order: the targets' models first, so a time budget that runs out loses the least
VARIANTS = tuple(f"efficientvit_m{i}" for i in (0, 4, 1, 2, 3, 5))
TRAIN_VARIANTS = ("efficientvit_m0", "efficientvit_m4")

JAX_F32 = Contestant("cga_jax fp32", "cga_jax", "folded", "float32")
JAX_BF16 = Contestant("cga_jax bf16", "cga_jax", "folded", "bfloat16")
TORCH_F32 = Contestant("PyTorch fp32", "torch", "traced", "float32")
TORCH_BF16 = Contestant("PyTorch AMP bf16", "torch", "traced", "bfloat16")
TORCH_F16 = Contestant("PyTorch AMP fp16", "torch", "traced", "float16")
TORCH_COMPILED_BF16 = Contestant("PyTorch compiled AMP bf16", "torch", "compiled", "bfloat16")
JAX_TRAIN_BF16 = Contestant("cga_jax bf16", "cga_jax", "train", "bfloat16")
TORCH_TRAIN_BF16 = Contestant("PyTorch AMP bf16", "torch", "train", "bfloat16")


def _cases(variant: str, opts: dict[str, Any]) -> list[Case]:
    """Inference for every variant; the training step for M0 and M4. ``opts``: ``gpu_batch``,
    ``gpu_train_batch``, ``repeat_s``, ``gpu_torch_compile`` (adds a torch.compile contestant)."""
    repeat_s = opts.get("repeat_s") or REPEAT_S
    infer = [JAX_F32, JAX_BF16, TORCH_F32, TORCH_BF16, TORCH_F16]
    targets: list[tuple[Any, ...]] = [
        ("cga_jax bf16", TORCH_F16.label, TARGET_RATIO),
        ("cga_jax bf16", TORCH_BF16.label, TARGET_RATIO),
        ("cga_jax fp32", TORCH_F32.label, None),
    ]
    if opts.get("gpu_torch_compile"):
        infer.append(TORCH_COMPILED_BF16)
        targets.append(("cga_jax bf16", TORCH_COMPILED_BF16.label, None))
    abs_targets = ()
    if variant == "efficientvit_m0":
        abs_targets = (
            ("cga_jax bf16", 3 * PAPER_V100_M0_IMG_S,
             f"3 × paper V100 {PAPER_V100_M0_IMG_S:,.0f} img/s"),
        )  # fmt: skip
    cases = [
        Case("gpu", variant, "infer", opts.get("gpu_batch") or INFER_BATCH, 0, tuple(infer), 1,
             targets=tuple(targets), device="gpu", repeat_s=repeat_s, abs_targets=abs_targets)
    ]  # fmt: skip
    if variant in TRAIN_VARIANTS:
        cases.append(
            Case("gpu", variant, "train", opts.get("gpu_train_batch") or TRAIN_BATCH, 0,
                 (JAX_TRAIN_BF16, TORCH_TRAIN_BF16), 1,
                 targets=(("cga_jax bf16", TORCH_TRAIN_BF16.label, TARGET_RATIO),),
                 device="gpu", repeat_s=repeat_s)
        )  # fmt: skip
    return cases


SECTION = Section(
    "gpu",
    "Accelerator: official GPU protocol (BN folded, 224x224, batch 2048 or the largest that "
    "fits, throughput) and the training step (bf16, batch 256)",
    VARIANTS,
    _cases,
    in_default_run=False,
)
