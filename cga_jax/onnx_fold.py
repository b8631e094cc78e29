"""Constant folding for the ONNX exporter: evaluate a jaxpr equation whose inputs are all
constants, with numpy.

numpy, not JAX: an eager JAX primitive compiles one XLA kernel per shape, and an exported model
has hundreds of constant equations (BatchNorm folding, the attention-bias gather and its index
arithmetic). Primitives without a numpy rule here fall back to ``primitive.bind``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cga_jax.onnx_values import Val, aval_of, constant, size_of, to_numpy


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero (XLA's), not numpy's floor."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _int_div(a, b) if np.issubdtype(a.dtype, np.integer) else np.divide(a, b)


# elementwise: computed on the (broadcastable) arrays as stored, pending broadcasts kept
ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _div,
    "max": np.maximum, "min": np.minimum, "pow": np.power,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "eq": np.equal, "ne": np.not_equal,
    "and": np.bitwise_and, "or": np.bitwise_or, "not": np.invert,
    "neg": np.negative, "abs": np.abs, "sign": np.sign, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x), "tanh": np.tanh,
    "logistic": lambda x: 1 / (1 + np.exp(-x)), "floor": np.floor, "ceil": np.ceil,
}  # fmt: skip


def _gather(x: np.ndarray, idx: np.ndarray, p: dict) -> np.ndarray | None:
    """``x[..., idx, ...]`` along one axis (``jnp.take`` / fancy indexing), else None."""
    dn = p["dimension_numbers"]
    if len(dn.start_index_map) != 1 or dn.operand_batching_dims or idx.shape[-1:] != (1,):
        return None
    (axis,) = dn.start_index_map
    nb = idx.ndim - 1
    offsets = [*range(axis), *range(axis + nb, nb + x.ndim - 1)]
    sizes = [int(s) for s in p["slice_sizes"]]
    if (tuple(dn.collapsed_slice_dims) != (axis,) or tuple(dn.offset_dims) != tuple(offsets)
            or sizes != [1 if a == axis else x.shape[a] for a in range(x.ndim)]):  # fmt: skip
        return None
    i = idx[..., 0]
    if i.size and (i.min() < 0 or i.max() >= x.shape[axis]):
        return None  # out of bounds: leave XLA's clamp / fill semantics to JAX
    return np.take(x, i, axis=axis)


def fold(eqn: Any, ins: list[Val]) -> list[Val]:
    """The constant outputs of ``eqn`` applied to constants ``ins``."""
    prim = eqn.primitive.name
    shapes = [aval_of(v)[0] for v in eqn.outvars]
    dtype = aval_of(eqn.outvars[0])[1]
    arrs = [v.const for v in ins]
    p = eqn.params
    if prim in ELEMENTWISE:
        return [constant(np.asarray(ELEMENTWISE[prim](*arrs)).astype(dtype), shapes[0])]
    if prim == "integer_pow":
        return [constant(np.power(arrs[0], p["y"]).astype(dtype), shapes[0])]
    if prim == "broadcast_in_dim":  # keep it pending: only insert the new axes
        shape = [1] * len(shapes[0])
        for src, dst in enumerate(p["broadcast_dimensions"]):
            shape[dst] = arrs[0].shape[src]
        return [constant(arrs[0].reshape(shape), shapes[0])]
    full = [np.broadcast_to(a, [size_of(d, None) for d in v.shape])
            for a, v in zip(arrs, ins, strict=True)]  # fmt: skip
    out = _fold_full(prim, full, p, shapes, dtype)
    if out is None:
        res = eqn.primitive.bind(*full, **p)
        return [constant(to_numpy(o)) for o in (res if eqn.primitive.multiple_results else [res])]
    return [constant(np.asarray(o)) for o in out]


def _fold_full(prim: str, full: list, p: dict, shapes: list, dtype: np.dtype) -> list | None:
    """numpy rules on fully broadcast arrays; None when there is none."""
    x = full[0] if full else None
    if prim in ("convert_element_type", "stop_gradient", "copy", "copy_p"):
        return [x.astype(dtype)]
    if prim == "reshape" and p.get("dimensions") is None:
        return [x.reshape(shapes[0])]
    if prim == "squeeze":
        return [np.squeeze(x, tuple(p["dimensions"]))]
    if prim == "transpose":
        return [np.transpose(x, p["permutation"])]
    if prim == "select_n":
        return [np.choose(full[0].astype(np.int32), full[1:]).astype(dtype)]
    if prim == "iota":
        shape, dim = shapes[0], p["dimension"]
        ar = np.arange(shape[dim], dtype=dtype).reshape(
            [-1 if a == dim else 1 for a in range(len(shape))]
        )
        return [np.broadcast_to(ar, shape)]  # fmt: skip
    if prim == "concatenate":
        return [np.concatenate(full, axis=p["dimension"])]
    if prim == "slice":
        strides = p["strides"] or (1,) * x.ndim
        idx = tuple(slice(s, e, st) for s, e, st in
                    zip(p["start_indices"], p["limit_indices"], strides, strict=True))  # fmt: skip
        return [x[idx]]
    if prim == "split":
        cuts = np.cumsum([int(s) for s in p["sizes"]])[:-1]
        return list(np.split(x, cuts, axis=p["axis"]))
    if prim in ("reduce_sum", "reduce_max", "reduce_min"):
        fn = {"reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}[prim]
        return [fn(x, axis=tuple(p["axes"])).astype(dtype)]
    if prim == "gather":
        out = _gather(x, full[1], p)
        return None if out is None else [out]
    return None
