"""Shared inputs of one benchmark run, made once per variant in a throw-away process:

* ``<variant>.npz``: random timm weights with calibrated BN statistics (timm layout), loaded by
  every framework so that all of them compute the same function;
* ``<variant>_b<batch>.onnx``: the BN-fused timm model exported with a fixed batch (opset 17).

Usage: ``python -m bench.prepare VARIANT[,VARIANT...] OUT_DIR [--onnx-batch B ...]`` (the ONNX
batches apply to every variant named).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bench.common import IMG
from bench.tasks_torch import fused_eval, load_timm

OPSET = 17


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random weights, BN affine U(0.5, 1.5)/N(0, 0.1), attention biases N(0, 0.5), then BN
    running statistics measured on random images: well-scaled, non-degenerate logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * fan_in**-0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, _BatchNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average over the calibration batches
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, IMG, IMG, generator=g))
        for mod in model.modules():
            if isinstance(mod, _BatchNorm):
                mod.momentum = 0.1
    model.eval()


def save_weights(variant: str, path: pathlib.Path, seed: int = 0) -> None:
    model = load_timm(variant, None)
    randomize_(model, seed)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(path, **sd)


def export_onnx(variant: str, weights: pathlib.Path, batch: int, path: pathlib.Path) -> None:
    model = fused_eval(load_timm(variant, str(weights)))
    x = torch.randn(batch, 3, IMG, IMG)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: it needs no onnxscript and gives a fixed-shape graph.
        torch.onnx.export(
            model,
            (x,),
            str(path),
            opset_version=OPSET,
            input_names=["x"],
            output_names=["logits"],
            dynamo=False,
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variants", help="comma-separated")
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--onnx-batch", type=int, action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    for variant in args.variants.split(","):
        weights = args.out_dir / f"{variant}.npz"
        if not weights.exists():
            save_weights(variant, weights)
        for b in args.onnx_batch:
            onnx_path = args.out_dir / f"{variant}_b{b}.onnx"
            if not onnx_path.exists():
                export_onnx(variant, weights, b, onnx_path)


if __name__ == "__main__":
    main()
