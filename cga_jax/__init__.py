"""cga_jax: EfficientViT (MSRA, CVPR 2023) with Cascaded Group Attention in JAX / Flax NNX."""

from cga_jax.attention import CascadedGroupAttention, LocalWindowAttention, attention_bias_index
from cga_jax.classes import imagenet_class_names
from cga_jax.config import VARIANTS, EfficientViTConfig
from cga_jax.errors import CheckpointError
from cga_jax.factory import create_model, get_config, list_models
from cga_jax.fuse import fuse_bn
from cga_jax.layers import set_impl
from cga_jax.model import EfficientViT
from cga_jax.onnx_export import export_onnx
from cga_jax.ops import IMPLS, use_impl
from cga_jax.torch_export import export_torch
from cga_jax.xla_options import apply_cpu_flags

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "VARIANTS",
    "apply_cpu_flags",
    "CascadedGroupAttention",
    "CheckpointError",
    "EfficientViT",
    "EfficientViTConfig",
    "LocalWindowAttention",
    "attention_bias_index",
    "create_model",
    "export_onnx",
    "export_torch",
    "fuse_bn",
    "get_config",
    "imagenet_class_names",
    "list_models",
    "set_impl",
    "use_impl",
]
