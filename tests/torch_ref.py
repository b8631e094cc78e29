"""PyTorch-side helpers for parity tests: timm models with randomised, calibrated weights.

Default inits hide bugs (several BN weights start at 0), and purely random BN running stats
make eval logits explode, so: random weights, BN weights U(0.5, 1.5), BN biases N(0, 0.1),
attention biases N(0, 0.5); running stats measured on random batches, then perturbed (as the
official fixtures were made).
"""

from __future__ import annotations

import numpy as np

torch = __import__("pytest").importorskip("torch")
timm = __import__("pytest").importorskip("timm")
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * fan_in**-0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, _BatchNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def calibrate_bn_(
    model: nn.Module, img_hw=(224, 224), seed: int = 0, batches: int = 2, batch_size: int = 4
) -> nn.Module:
    """Running stats = real statistics on random inputs, then perturbed; leaves eval mode."""
    g = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, *img_hw, generator=g))
        for bn in bns:
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=g))
            bn.running_var.mul_(torch.rand(std.shape, generator=g) * 0.45 + 0.8)
    model.eval()
    return model


def make_timm(name: str, seed: int = 0, calib_hw=None, **kwargs) -> nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs)
    randomize_(model, seed)
    img = kwargs.get("img_size", 224)
    calibrate_bn_(model, calib_hw or ((img, img) if isinstance(img, int) else img), seed)
    return model


def state_dict_np(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def run_nchw(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def timm_from_config(cfg, state_dict: dict[str, np.ndarray] | None = None) -> nn.Module:
    """A timm EfficientVitMsra built from a cga_jax config, optionally with a timm-layout sd."""
    from timm.models.efficientvit_msra import EfficientVitMsra

    model = EfficientVitMsra(
        img_size=cfg.img_size,
        embed_dim=cfg.embed_dim,
        key_dim=cfg.key_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        kernels=cfg.kernels,
        down_ops=cfg.down_ops,
        num_classes=cfg.num_classes,
    )
    if state_dict is not None:
        sd = {
            k: torch.from_numpy(np.asarray(v))
            for k, v in state_dict.items()
            if not k.endswith("attention_bias_idxs")
        }
        model.load_state_dict(sd, strict=True)
    return model


def train_grads(model: nn.Module, x_nchw: np.ndarray, r: np.ndarray, dtype=None):
    """Training-mode logits and d/d(input, params) of sum(logits * r); dtype e.g. torch.float64."""
    dtype = dtype or torch.float32
    model = model.to(dtype).train()
    x = torch.from_numpy(x_nchw).to(dtype).requires_grad_(True)
    y = model(x)
    (y * torch.from_numpy(r).to(dtype)).sum().backward()
    grads = {k: p.grad.double().numpy() for k, p in model.named_parameters() if p.grad is not None}
    return y.detach().double().numpy(), x.grad.double().numpy(), grads


def timm_and_cga_pair(name: str, seed: int = 0, **kwargs):
    """A randomised, calibrated timm model and a cga_jax model with the same weights, both eval."""
    import cga_jax
    from cga_jax.loading import load_timm_state_dict

    tm = make_timm(name, seed=seed, **kwargs)
    jm = cga_jax.create_model(name, **kwargs)
    load_timm_state_dict(jm, state_dict_np(tm))
    jm.eval()
    return tm, jm
