"""PyTorch (timm) side: BN-fused traced/eager inference and an AdamW train step, on the CPU or
on CUDA, in float32 or under autocast (AMP)."""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import GPU_MEM_FRACTION, LR, WEIGHT_DECAY, inputs_nchw, labels
from bench.worker_api import Task

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = "cpu"  # set by setup()


def replace_batchnorm(net: nn.Module) -> nn.Module:
    """The official EfficientViT ``replace_batchnorm``: every child with ``fuse()`` (timm's
    ``ConvNorm``/``NormLinear``) becomes its fused conv/linear, stray BatchNorm2d an identity."""
    for name, child in net.named_children():
        if hasattr(child, "fuse"):
            setattr(net, name, child.fuse())
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, name, nn.Identity())
        else:
            replace_batchnorm(child)
    return net


def load_timm(variant: str, weights: str | None) -> nn.Module:
    model = timm.create_model(variant, pretrained=False)
    if weights is not None:
        with np.load(weights) as f:
            sd = {k: torch.from_numpy(f[k]) for k in f.files}
        model.load_state_dict(sd, strict=True)
    return model


def fused_eval(model: nn.Module) -> nn.Module:
    model.eval()
    with torch.no_grad():
        replace_batchnorm(model)
    return model.eval()


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only possible once per process)
        pass


def setup(proc: dict[str, Any]) -> dict[str, Any]:
    """CPU: the thread count. CUDA: TF32 allowed for matmuls and convolutions (what JAX's default
    precision does on the GPU), cuDNN autotuning (XLA autotunes too), the device-memory share."""
    global DEVICE
    info: dict[str, Any] = {"torch": torch.__version__}
    if proc.get("platform") == "cuda":
        DEVICE = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_per_process_memory_fraction(GPU_MEM_FRACTION)
        info.update(
            device=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            allow_tf32=True,
            cudnn_benchmark=True,
        )
    elif proc.get("threads"):
        set_threads(proc["threads"])
    return info


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    amp = DTYPES[dtype]
    return torch.autocast(DEVICE, dtype=amp) if amp is not None else contextlib.nullcontext()


def build_infer(spec: dict[str, Any]) -> Task:
    """``mode='traced'``: the official protocol (fused, ``torch.jit.trace`` in float32, run under
    autocast for AMP); ``'eager'``: the fused model called directly; ``'compiled'``:
    ``torch.compile`` of the fused model. All under ``torch.no_grad()``."""
    model = fused_eval(load_timm(spec["variant"], spec["weights"])).to(DEVICE)
    x = torch.from_numpy(inputs_nchw(spec["batch"])).to(DEVICE)
    mode = spec.get("mode", "traced")
    dtype = spec.get("dtype", "float32")
    if mode == "traced":
        with torch.no_grad():
            model = torch.jit.trace(model, (x,))
    elif mode == "compiled":
        model = torch.compile(model)
    elif mode != "eager":
        raise ValueError(f"unknown torch inference mode {mode!r}")

    def step() -> torch.Tensor:
        with torch.no_grad(), _autocast(dtype):
            out = model(x)
        _sync()
        return out

    info = {"mode": mode, "bn": "fused", "dtype": dtype, "device": DEVICE}
    return Task(step=step, images_per_step=spec["batch"], info=info)


def build_train(spec: dict[str, Any]) -> Task:
    """Eager train step: forward (train-mode BN), cross-entropy, backward, AdamW; AMP: the
    forward and loss under autocast (bfloat16 needs no loss scaling). On CUDA the fused AdamW."""
    model = load_timm(spec["variant"], spec["weights"]).to(DEVICE).train()
    fused = DEVICE == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
    x = torch.from_numpy(inputs_nchw(spec["batch"])).to(DEVICE)
    y = torch.from_numpy(labels(spec["batch"])).long().to(DEVICE)
    dtype = spec.get("dtype", "float32")
    if dtype == "float16":
        raise ValueError("float16 training needs loss scaling: use bfloat16")

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        _sync()
        return loss.detach()

    info = {"mode": "eager", "dtype": dtype, "fused_adamw": fused, "device": DEVICE}
    return Task(step=step, images_per_step=spec["batch"], info=info)


def build(spec: dict[str, Any]) -> Task:
    return build_train(spec) if spec["task"] == "train" else build_infer(spec)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def device_memory() -> dict[str, Any]:
    """Peak memory allocated by tensors since the task's build (CUDA only)."""
    if DEVICE != "cuda":
        return {}
    return {
        "device_bytes_in_use_mib": torch.cuda.memory_allocated() / 2**20,
        "device_peak_bytes_in_use_mib": torch.cuda.max_memory_allocated() / 2**20,
    }
