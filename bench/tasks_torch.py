"""PyTorch (timm) side: BN-fused traced/eager inference and an eager AdamW train step."""

from __future__ import annotations

from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import LR, WEIGHT_DECAY, inputs_nchw, labels
from bench.worker_api import Task


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


def build_infer(spec: dict[str, Any]) -> Task:
    """``mode='traced'``: the official protocol (fused, ``torch.jit.trace``); ``'eager'``: the
    fused model called directly. Both under ``torch.no_grad()``."""
    set_threads(spec["threads"])
    model = fused_eval(load_timm(spec["variant"], spec["weights"]))
    x = torch.from_numpy(inputs_nchw(spec["batch"]))
    mode = spec.get("mode", "traced")
    if mode == "traced":
        with torch.no_grad():
            model = torch.jit.trace(model, (x,))
    elif mode != "eager":
        raise ValueError(f"unknown torch inference mode {mode!r}")

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return Task(step=step, images_per_step=spec["batch"], info={"mode": mode, "bn": "fused"})


def build_train(spec: dict[str, Any]) -> Task:
    """Eager train step: forward (train-mode BN), cross-entropy, backward, AdamW (defaults)."""
    set_threads(spec["threads"])
    model = load_timm(spec["variant"], spec["weights"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x = torch.from_numpy(inputs_nchw(spec["batch"]))
    y = torch.from_numpy(labels(spec["batch"])).long()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return Task(step=step, images_per_step=spec["batch"], info={"mode": "eager"})


def build(spec: dict[str, Any]) -> Task:
    return build_train(spec) if spec["task"] == "train" else build_infer(spec)
