"""ONNX export of a cga_jax model, straight from JAX (no PyTorch).

:func:`export_onnx` folds BatchNorm, switches the primitives to their standard implementation
(plain ``lax`` convolutions and matmuls: the XLA-CPU kernels are chains of per-tap slices), traces
the forward pass to a jaxpr with a symbolic batch and converts it with
:mod:`cga_jax.jaxpr_onnx`. Needs the ``onnx`` extra (``pip install cga_jax[onnx]``). See
docs/deploy.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.convert import atomic_write
from cga_jax.fuse import fuse_bn
from cga_jax.jaxpr_onnx import MIN_OPSET, convert_closed_jaxpr
from cga_jax.layers import set_impl
from cga_jax.onnx_graph import GraphBuilder, Node
from cga_jax.onnx_values import tensor

LAYOUTS = ("NHWC", "NCHW")
DEFAULT_OPSET = 17
BATCH_NAME = "batch"


def parse_img_size(value: int | str | Sequence[int]) -> tuple[int, int]:
    """``224``, ``"224"``, ``"256x192"`` (H x W) or ``(256, 192)`` -> (H, W)."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"image size must be S or HxW (e.g. 224 or 256x192), got {value!r}")
        value = tuple(int(p) for p in parts) * (3 - len(parts))
    hw = (int(value), int(value)) if isinstance(value, int | np.integer) else tuple(value)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image size must be positive S or (H, W), got {value!r}")
    return int(hw[0]), int(hw[1])


def _check_args(batch: int | None, opset: int, input_layout: str) -> None:
    import onnx

    if batch is not None and (not isinstance(batch, int | np.integer) or batch < 1):
        raise ValueError(f"batch must be None (dynamic) or a positive int, got {batch!r}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {newest}] (this onnx), got {opset}")
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")


def inference_copy(model: nnx.Module, fuse: bool = True) -> nnx.Module:
    """An eval-mode copy of ``model`` (BN folded when ``fuse``) on the standard primitives."""
    m = fuse_bn(model) if fuse else nnx.merge(*nnx.split(model))
    m.eval()
    return set_impl(m, "standard")


def to_onnx_model(
    model: nnx.Module,
    *,
    batch: int | None = None,
    img_size: int | str | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    input_layout: str = "NHWC",
    fuse: bool = True,
) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (see :func:`export_onnx`), checked."""
    import onnx

    _check_args(batch, opset, input_layout)
    h, w = parse_img_size(img_size if img_size is not None else model.cfg.img_hw)
    chans = model.cfg.in_chans
    m = inference_copy(model, fuse)
    graphdef, state = nnx.split(m)

    def forward(x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    b = jax.export.symbolic_shape(BATCH_NAME)[0] if batch is None else int(batch)
    closed = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct((b, h, w, chans), jnp.float32))
    g = GraphBuilder()
    nchw = input_layout == "NCHW"
    x = tensor("input", (b, h, w, chans), np.float32, (0, 3, 1, 2) if nchw else ())
    (out,) = convert_closed_jaxpr(closed, [x], g, opset=opset, batch=None if batch else b)
    name = "logits" if m.num_classes > 0 else "features"
    g.nodes.append(_identity(g, out, name))
    dim = BATCH_NAME if batch is None else int(batch)
    in_shape = [dim, chans, h, w] if nchw else [dim, h, w, chans]
    proto = g.to_model(
        [("input", np.float32, in_shape)],
        [(name, np.float32, [dim, *out.shape[1:]])],
        opset=opset,
        graph_name=type(model).__name__,
        doc=f"cga_jax {type(model).__name__}: images {input_layout} float32 -> {name}",
        metadata={"input_layout": input_layout, "img_size": f"{h}x{w}",
                  "bn_folded": str(bool(fuse)).lower()},
    )  # fmt: skip
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _identity(g: GraphBuilder, out: Any, name: str) -> Node:
    """The node naming the graph output (a plain tensor in logical axis order)."""
    if out.is_const or out.pending or not out.identity:
        raise NotImplementedError("ONNX export: the model output is not a plain tensor")
    return Node("Identity", [out.name], [name], {})


def export_onnx(
    model: nnx.Module,
    path: str | os.PathLike | None = None,
    *,
    batch: int | None = None,
    img_size: int | str | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    input_layout: str = "NHWC",
    fuse: bool = True,
) -> Any:
    """Export ``model`` to ONNX; returns the ``onnx.ModelProto`` and writes it to ``path``.

    The graph maps images float32 (B, H, W, C) (``input_layout="NHWC"``, cga_jax's layout) or
    (B, C, H, W) (``"NCHW"``, PyTorch's) to logits (B, classes); weights are baked in. B is
    dynamic (named ``"batch"``) when ``batch`` is None, else fixed. ``img_size`` (default: the
    model's config) is the input's H, W: an int, ``(H, W)`` or ``"HxW"``; any size the model
    runs works. BatchNorm is folded first (``fuse``) and the standard primitives are used, so
    convolutions are ``Conv`` nodes (depthwise: ``group = channels``; 1x1: ``Conv`` with a
    1x1 kernel), attention products ``MatMul`` and the gathered attention biases constants.
    The graph passes ``onnx.checker`` (full check); the file is written atomically.
    ``model`` is not modified.
    """
    proto = to_onnx_model(model, batch=batch, img_size=img_size, opset=opset,
                          input_layout=input_layout, fuse=fuse)  # fmt: skip
    if path is not None:
        data = proto.SerializeToString()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(os.fspath(path), write)
    return proto
