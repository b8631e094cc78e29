"""ONNX export of a cga_jax model, straight from JAX (no PyTorch).

:func:`export_onnx` folds BatchNorm, switches the primitives to their standard implementation
(plain ``lax`` convolutions and matmuls: the XLA-CPU kernels are chains of per-tap slices), traces
the forward pass to a jaxpr with a symbolic batch and converts it with
:mod:`cga_jax.jaxpr_onnx`. Needs the ``onnx`` extra (``pip install cga_jax[onnx]``). See
docs/deploy.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cga_jax.checkpoint_io import atomic_write_bytes
from cga_jax.fuse import fuse_bn
from cga_jax.jaxpr_onnx import MIN_OPSET, convert_closed_jaxpr
from cga_jax.layers import set_impl
from cga_jax.onnx_graph import GraphBuilder, Node
from cga_jax.onnx_values import is_symbolic, tensor

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


def function_to_onnx(
    fn: Callable[..., Any],
    input_shapes: Sequence[Sequence[int | None]],
    *,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    nchw_inputs: Sequence[int] = (),
    graph_name: str = "cga_jax",
    doc: str = "",
    metadata: dict[str, str] | None = None,
) -> Any:
    """ONNX graph of a JAX function of float32 arrays (weights closed over become constants).

    ``input_shapes``: one shape per argument; ``None`` as the first size of every input that has
    one makes a dynamic batch (named ``"batch"``), shared by all of them. Inputs listed in
    ``nchw_inputs`` (rank 4, NHWC for ``fn``) are NCHW in the graph. Returns the checked
    ``onnx.ModelProto``; its outputs are ``fn``'s, in order.
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {newest}] (this onnx), got {opset}")
    dynamic = any(s and s[0] is None for s in input_shapes)
    b = jax.export.symbolic_shape(BATCH_NAME)[0] if dynamic else None
    shapes = [tuple(b if d is None else int(d) for d in s) for s in input_shapes]
    closed = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
    in_names = list(input_names or [f"input_{i}" for i in range(len(shapes))])
    args = []
    for i, (name, shape) in enumerate(zip(in_names, shapes, strict=True)):
        nchw = i in nchw_inputs
        if nchw and len(shape) != 4:
            raise ValueError(f"input {i}: only rank-4 (NHWC) inputs can be given as NCHW")
        args.append(tensor(name, shape, np.float32, (0, 3, 1, 2) if nchw else ()))
    g = GraphBuilder()
    outs = convert_closed_jaxpr(closed, args, g, opset=opset, batch=b)
    out_names = list(output_names or [f"output_{i}" for i in range(len(outs))])
    if len(out_names) != len(outs):
        raise ValueError(f"{len(out_names)} output names for {len(outs)} outputs")
    for out, name in zip(outs, out_names, strict=True):
        g.nodes.append(Node("Identity", [out.name], [name], {}))

    def dims(shape: Sequence[Any], perm: Sequence[int]) -> list[int | str]:
        return [BATCH_NAME if is_symbolic(shape[a]) else int(shape[a]) for a in perm]

    proto = g.to_model(
        [(a.name, np.float32, dims(a.shape, a.perm)) for a in args],
        [(n, o.dtype, dims(o.shape, o.perm)) for n, o in zip(out_names, outs, strict=True)],
        opset=opset,
        graph_name=graph_name,
        doc=doc,
        metadata=metadata,
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_onnx_model(
    model: nnx.Module,
    *,
    batch: int | None = None,
    img_size: int | str | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    input_layout: str = "NHWC",
    fuse: bool = True,
) -> Any:
    """The checked ``onnx.ModelProto`` of ``model`` (see :func:`export_onnx`)."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be None (dynamic) or a positive int, got {batch!r}")
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")
    h, w = parse_img_size(img_size if img_size is not None else model.cfg.img_hw)
    m = nnx.merge(*nnx.split(model))  # a copy: eval mode and the switch must not leak out
    m.eval()
    graphdef, state = nnx.split(set_impl(m, "standard"))

    def forward(x: jax.Array) -> jax.Array:
        # BN folded inside the trace: its arithmetic on the weights becomes constant
        # equations that the converter folds with numpy (eagerly, JAX would compile ~100
        # small kernels)
        net = nnx.merge(graphdef, state)
        return (fuse_bn(net) if fuse else net)(x)

    name = "logits" if m.num_classes > 0 else "features"
    return function_to_onnx(
        forward,
        [(batch, h, w, m.cfg.in_chans)],
        opset=opset,
        input_names=["input"],
        output_names=[name],
        nchw_inputs=(0,) if input_layout == "NCHW" else (),
        graph_name=type(model).__name__,
        doc=f"cga_jax {type(model).__name__}: images {input_layout} float32 -> {name}",
        metadata={"input_layout": input_layout, "img_size": f"{h}x{w}",
                  "bn_folded": str(bool(fuse)).lower()},
    )  # fmt: skip


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
        atomic_write_bytes(path, proto.SerializeToString())
    return proto
