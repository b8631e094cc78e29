"""jaxpr -> ONNX: the converter behind :func:`cga_jax.export_onnx`.

It walks a closed jaxpr (nested ``jit`` / ``custom_jvp_call`` bodies inlined) and emits one ONNX
node per primitive, with three jobs beyond the one-to-one mapping:

* **layout**: values keep the axis order their producer gives them (:mod:`cga_jax.onnx_values`);
  ``Conv`` wants NCHW, so NHWC activations stay NCHW from conv to conv and a ``Transpose`` is
  emitted only where a reshape or a matmul needs another order;
* **constants**: every primitive whose inputs are all constants is evaluated here (the
  attention-bias gather becomes a (heads, N, N) initializer);
* **patterns**: ``dot_general`` of an NHWC map with a weight matrix (a 1x1 conv) becomes ``Conv``
  with its bias add folded in; the ``reduce_max .. exp .. reduce_sum .. div`` chain of
  ``jax.nn.softmax`` becomes ``Softmax``; ``reduce_sum`` then a division by the count becomes
  ``ReduceMean``; ``max(x, 0)`` becomes ``Relu``; a gather that only slices becomes ``Slice``.

Only the primitives of inference graphs made of convolutions, matmuls, elementwise ops and
reshapes are covered; anything else raises ``NotImplementedError`` naming the primitive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from cga_jax.onnx_fold import fold
from cga_jax.onnx_graph import TENSOR_TYPES, GraphBuilder
from cga_jax.onnx_values import (
    Val,
    aval_of,
    constant,
    inverse,
    is_symbolic,
    reshape_groups,
    same_dim,
    size_of,
    tensor,
    to_numpy,
    transpose_from,
)

MIN_OPSET = 17
CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
          "pow": "Pow"}  # fmt: skip
UNARY = {"exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid", "neg": "Neg",
         "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf", "sin": "Sin", "cos": "Cos"}  # fmt: skip
SUM_MAX = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}


class Converter:
    """One conversion. ``batch``: the symbolic batch dimension (None for a fixed batch)."""

    def __init__(self, graph: GraphBuilder, opset: int, batch: Any = None):
        if opset < MIN_OPSET:
            raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
        self.g = graph
        self.opset = opset
        self.batch = batch
        self._transposes: dict[tuple[str, tuple[int, ...]], str] = {}
        self._consts: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, str]] = {}
        self._batch_size: str | None = None
        self._first_input: str | None = None

    # ---- values -------------------------------------------------------------------------
    def in_perm(self, v: Val, perm: Sequence[int], full: bool = False) -> str:
        """ONNX name of ``v`` stored in axis order ``perm`` (rank-0 constants as scalars);
        with ``full`` any pending broadcast is carried out (``Expand``)."""
        perm = tuple(perm)
        if v.is_const:
            static = not any(is_symbolic(d) for d in v.shape)
            arr = v.const
            if full and v.pending and static:
                arr = np.broadcast_to(arr, [int(d) for d in v.shape])
            key = (id(v.const), perm, full and static)
            if key not in self._consts:
                self._consts[key] = (v.const, self.g.const(np.transpose(arr, perm)))
            name = self._consts[key][1]
            if full and v.pending and not static:
                name = self.g.op("Expand", name, self.shape_tensor([v.shape[a] for a in perm]))
            return name
        name = v.name
        if v.perm != perm:
            key = (name, perm)
            if key not in self._transposes:
                self._transposes[key] = self.g.op("Transpose", name,
                                                  perm=transpose_from(v.perm, perm))  # fmt: skip
            name = self._transposes[key]
        if full and v.pending:
            name = self.g.op("Expand", name, self.shape_tensor([v.shape[a] for a in perm]))
        return name

    def own(self, v: Val, full: bool = True) -> str:
        """``v`` in the axis order it already has."""
        return self.in_perm(v, v.perm, full)

    def shape_tensor(self, dims: Sequence[Any]) -> str:
        """An int64 1-D tensor of ``dims``; ``k * batch`` is computed from the graph input."""
        if not any(is_symbolic(d) for d in dims):
            return self.g.const([int(d) for d in dims])
        parts = []
        for d in dims:
            if is_symbolic(d):
                k = size_of(d, self.batch) // size_of(self.batch, self.batch)
                b = self.batch_size()
                parts.append(b if k == 1 else self.g.op("Mul", b, self.g.const([k])))
            else:
                parts.append(self.g.const([int(d)]))
        return self.g.op("Concat", *parts, axis=0)

    def batch_size(self) -> str:
        if self._batch_size is None:
            shape = self.g.op("Shape", self._first_input)
            self._batch_size = self.g.op("Slice", shape, self.g.const([0]), self.g.const([1]))
        return self._batch_size

    def out(self, name: str, atom: Any, perm: Sequence[int] = (), bshape=None) -> Val:
        shape, dtype = aval_of(atom)
        return tensor(name, shape, dtype, perm, bshape)

    # ---- walking --------------------------------------------------------------------------
    def convert(self, closed: Any, args: Sequence[Val]) -> list[Val]:
        """Convert ``closed`` (a ClosedJaxpr) applied to ``args``; returns its outputs."""
        self._first_input = self._first_input or next((a.name for a in args if a.name), None)
        return self.run(closed.jaxpr, [constant(to_numpy(c)) for c in closed.consts], args)

    def run(self, jaxpr: Any, consts: Sequence[Val], args: Sequence[Val]) -> list[Val]:
        env: dict[Any, Val] = {}
        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        uses: dict[Any, int] = {}
        for eqn in jaxpr.eqns:
            for a in eqn.invars:
                if not isinstance(a, jcore.Literal):
                    uses[a] = uses.get(a, 0) + 1
        for a in jaxpr.outvars:
            if not isinstance(a, jcore.Literal):
                uses[a] = uses.get(a, 0) + 2  # a jaxpr output is never fused away

        def read(a: Any) -> Val:
            if isinstance(a, jcore.Literal):
                return constant(np.asarray(a.val, dtype=a.aval.dtype))
            return env[a]

        eqns = list(jaxpr.eqns)
        i = 0
        while i < len(eqns):
            matched = match_softmax(eqns, i, uses) or match_mean(eqns, i, uses, read)
            if matched is not None:
                n, fn = matched
                fn(self, env, read)
                i += n
                continue
            eqn = eqns[i]
            ins = [read(a) for a in eqn.invars]
            outs = self.apply(eqn, ins, uses)
            for var, val in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = val
            i += 1
        return [read(a) for a in jaxpr.outvars]

    def apply(self, eqn: Any, ins: list[Val], uses: dict) -> list[Val]:
        prim = eqn.primitive.name
        sub = next((eqn.params[k] for k in CALL_PARAMS if k in eqn.params), None)
        if sub is not None and hasattr(sub, "jaxpr"):
            consts = [constant(to_numpy(c)) for c in sub.consts]
            return self.run(sub.jaxpr, consts, ins)
        if all(v.is_const for v in ins) and not any(
            is_symbolic(d) for a in (*ins, *eqn.outvars) for d in (a.shape if isinstance(a, Val)
                                                                     else aval_of(a)[0])
        ):  # fmt: skip
            return fold(eqn, ins)
        rule = RULES.get(prim)
        if rule is None:
            raise NotImplementedError(f"ONNX export: no rule for the JAX primitive {prim!r}")
        out = rule(self, eqn, ins, uses)
        return out if isinstance(out, list) else [out]


# ---- rules ------------------------------------------------------------------------------------
def _elementwise(c: Converter, op: str, eqn: Any, ins: list[Val]) -> Val:
    shape, dtype = aval_of(eqn.outvars[0])
    r = len(shape)
    ts = [v for v in ins if not v.is_const and v.rank == r]
    perm = next((v.perm for v in ts if not v.pending), ts[0].perm if ts else tuple(range(r)))
    names = []
    for v in ins:
        if v.is_const and v.rank == 0:
            names.append(c.g.const(v.const.astype(dtype) if op not in ("Where",) else v.const))
        elif v.is_const:
            arr = v.const if op == "Where" else v.const.astype(dtype)
            names.append(c.in_perm(constant(arr, v.shape), perm))
        else:
            names.append(c.in_perm(v, perm))
    bshape = tuple(
        shape[a] if any(v.rank == r and v.bshape[a] != 1 for v in ins) else 1 for a in range(r)
    )
    return c.out(c.g.op(op, *names), eqn.outvars[0], perm, bshape)


def _binary(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    prim = eqn.primitive.name
    if prim == "max":
        consts = [v for v in ins if v.is_const]
        others = [v for v in ins if not v.is_const]
        if len(consts) == 1 and consts[0].const.size == 1:
            k = float(consts[0].const.reshape(()))
            if k == 0.0:
                x = others[0]
                return c.out(c.g.op("Relu", c.own(x, False)), eqn.outvars[0], x.perm, x.bshape)
            if k == -np.inf:
                return others[0]
    if prim == "add":
        fused = _fuse_bias(c, eqn, ins, uses)
        if fused is not None:
            return fused
    return _elementwise(c, BINARY[prim], eqn, ins)


def _fuse_bias(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val | None:
    """``conv(x) + b`` (b constant along the channel axis only, the conv output used once) ->
    the conv's bias input."""
    (t, b) = ins if not ins[0].is_const else ins[::-1]
    if t.is_const or not b.is_const or t.pending or b.rank != t.rank:
        return None
    var = eqn.invars[0] if ins[0] is t else eqn.invars[1]
    node = c.g.producer(t.name)
    if node is None or node.op != "Conv" or len(node.inputs) != 2 or uses.get(var, 0) != 1:
        return None
    channel = t.perm[1]
    if any(b.const.shape[a] != 1 for a in range(b.rank) if a != channel):
        return None
    bias = b.const.reshape(-1).astype(np.dtype(t.dtype))
    if bias.size == 1:
        bias = np.broadcast_to(bias, (size_of(t.shape[channel], None),))
    node.inputs.append(c.g.const(np.ascontiguousarray(bias), "bias"))
    return t


def _unary(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    prim = eqn.primitive.name
    if prim == "rsqrt":
        y = c.g.op("Reciprocal", c.g.op("Sqrt", c.own(x, False)))
    elif prim == "integer_pow":
        y = c.g.op("Pow", c.own(x, False), c.g.const(np.asarray(eqn.params["y"], x.dtype)))
    else:
        y = c.g.op(UNARY[prim], c.own(x, False))
    return c.out(y, eqn.outvars[0], x.perm, x.bshape)


def _identity(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    _, dtype = aval_of(eqn.outvars[0])
    if dtype == x.dtype:
        return x
    return c.out(
        c.g.op("Cast", c.own(x, False), to=TENSOR_TYPES[dtype]), eqn.outvars[0], x.perm, x.bshape
    )


def _select_n(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    if len(ins) != 3:
        raise NotImplementedError("ONNX export: select_n with more than two cases")
    pred, f, t = ins
    return _elementwise(c, "Where", eqn, [pred, t, f])


def _reduce_axes(c: Converter, op: str, x: Val, axes: Sequence[int], keep: bool) -> tuple:
    """``op`` over logical ``axes`` of ``x``; returns (ONNX name, perm of the result)."""
    name = c.own(x, True)
    phys = sorted(x.perm.index(a) for a in axes)
    if op == "ReduceSum" or c.opset >= 18:
        y = c.g.op(op, name, c.g.const(phys), keepdims=int(keep))
    else:
        y = c.g.op(op, name, axes=phys, keepdims=int(keep))
    if keep:
        return y, x.perm
    kept = [a for a in range(x.rank) if a not in axes]
    return y, tuple(kept.index(a) for a in x.perm if a not in axes)


def _reduce(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    y, perm = _reduce_axes(c, SUM_MAX[eqn.primitive.name], ins[0], eqn.params["axes"], False)
    return c.out(y, eqn.outvars[0], perm)


def _broadcast_in_dim(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    shape, _ = aval_of(eqn.outvars[0])
    bd = tuple(eqn.params["broadcast_dimensions"])
    order = [bd[a] for a in x.perm]
    new = [a for a in range(len(shape)) if a not in bd]
    for n in new:  # each new axis right after the stored axis that precedes it logically
        pos = max((j + 1 for j, a in enumerate(order) if a < n), default=0)
        order.insert(pos, n)
    bshape = [1] * len(shape)
    for src, dst in enumerate(bd):
        bshape[dst] = x.bshape[src]
    name = c.own(x, False)
    if new:
        name = c.g.op("Unsqueeze", name, c.g.const(sorted(order.index(n) for n in new)))
    return c.out(name, eqn.outvars[0], order, bshape)


def _squeeze(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    dims = [d % x.rank for d in eqn.params["dimensions"]]
    if not dims:
        return x
    y = c.g.op("Squeeze", c.own(x, False), c.g.const(sorted(x.perm.index(d) for d in dims)))
    kept = [a for a in range(x.rank) if a not in dims]
    perm = tuple(kept.index(a) for a in x.perm if a not in dims)
    bshape = tuple(x.bshape[a] for a in kept)
    return c.out(y, eqn.outvars[0], perm, bshape)


def _transpose(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    p = tuple(eqn.params["permutation"])
    inv = inverse(p)
    perm = tuple(inv[a] for a in x.perm)
    bshape = tuple(x.bshape[a] for a in p)
    return c.out(x.name, eqn.outvars[0], perm, bshape)


def reshape(c: Converter, x: Val, shape: Sequence[Any], atom: Any = None) -> Val:
    """Reshape ``x`` to logical ``shape``, in its own axis order when the reshape only merges
    or splits axes that are stored together, else after one ``Transpose``."""
    isz = [size_of(d, c.batch) for d in x.shape]
    osz = [size_of(d, c.batch) for d in shape]
    groups = reshape_groups(isz, osz)
    pos = inverse(x.perm)

    def stored_together(perm: Sequence[int]) -> bool:
        p = inverse(perm)
        return all([p[a] for a in gi] == list(range(p[gi[0]], p[gi[0]] + len(gi)))
                   for gi, _ in groups if gi)  # fmt: skip

    perm = x.perm
    if not stored_together(perm):  # order the groups as their first axes are stored
        key = [min((pos[a] for a in gi), default=len(pos)) for gi, _ in groups]
        perm = tuple(a for k in sorted(range(len(groups)), key=lambda g: key[g])
                     for a in groups[k][0])  # fmt: skip
    name = c.in_perm(x, perm, full=True)
    ipos = inverse(perm)
    ordered = sorted((g for g in groups), key=lambda g: ipos[g[0][0]] if g[0] else len(ipos))
    operm = tuple(a for _, gj in ordered for a in gj)
    dims = [shape[a] for a in operm]
    n_sym = sum(is_symbolic(d) for d in dims)
    if n_sym > 1:
        raise NotImplementedError(f"ONNX export: reshape to {tuple(shape)} (two dynamic dims)")
    target = c.g.const([-1 if is_symbolic(d) else int(d) for d in dims])
    y = c.g.op("Reshape", name, target)
    if atom is None:
        return tensor(y, shape, x.dtype, operm)
    return c.out(y, atom, operm)


def _reshape(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    if eqn.params.get("dimensions") is not None:
        raise NotImplementedError("ONNX export: reshape with `dimensions`")
    return reshape(c, ins[0], aval_of(eqn.outvars[0])[0], eqn.outvars[0])


def _slice(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x = ins[0]
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * x.rank
    axes, st, en, sp = [], [], [], []
    for a in range(x.rank):
        if starts[a] == 0 and strides[a] == 1 and same_dim(limits[a], x.shape[a]):
            continue
        if is_symbolic(limits[a]) or is_symbolic(starts[a]):
            raise NotImplementedError("ONNX export: slicing a dynamic axis")
        axes.append(x.perm.index(a))
        st.append(int(starts[a]))
        en.append(int(limits[a]))
        sp.append(int(strides[a]))
    if not axes:
        return x
    g = c.g
    y = g.op("Slice", c.own(x), g.const(st), g.const(en), g.const(axes), g.const(sp))
    return c.out(y, eqn.outvars[0], x.perm)


def _gather(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    """Only the gather that slices axes at constant offsets (how ``x[:, a:b]`` lowers with a
    symbolic batch)."""
    x, idx = ins
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    axes = tuple(dn.start_index_map)
    ok = (
        idx.is_const and idx.const.size == len(axes)
        and tuple(dn.offset_dims) == tuple(range(x.rank)) and not dn.collapsed_slice_dims
        and not dn.operand_batching_dims
        and all(same_dim(sizes[a], x.shape[a]) for a in range(x.rank) if a not in axes)
        and not any(is_symbolic(x.shape[a]) or is_symbolic(sizes[a]) for a in axes)
    )  # fmt: skip
    if not ok:
        raise NotImplementedError("ONNX export: general gather on a non-constant operand")
    starts, ends = [], []
    for a, i in zip(axes, idx.const.reshape(-1), strict=True):
        n, size = int(x.shape[a]), int(sizes[a])
        starts.append(min(max(int(i), 0), n - size))  # XLA clamps the start
        ends.append(starts[-1] + size)
    g = c.g
    y = g.op("Slice", c.own(x), g.const(starts), g.const(ends),
             g.const([x.perm.index(a) for a in axes]))  # fmt: skip
    return c.out(y, eqn.outvars[0], x.perm)


def _split(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> list[Val]:
    x = ins[0]
    axis = eqn.params["axis"] % x.rank
    sizes = [int(s) for s in eqn.params["sizes"]]
    outs = c.g.node("Split", [c.own(x), c.g.const(sizes)], len(sizes), axis=x.perm.index(axis))
    return [c.out(n, v, x.perm) for n, v in zip(outs, eqn.outvars, strict=True)]


def _concatenate(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    d = eqn.params["dimension"]
    perm = next(v.perm for v in ins if not v.is_const)
    names = [c.in_perm(v, perm, full=True) for v in ins]
    return c.out(c.g.op("Concat", *names, axis=perm.index(d)), eqn.outvars[0], perm)


def _pad(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x, value = ins
    cfg = eqn.params["padding_config"]
    if any(int(i) != 0 for _, _, i in cfg) or any(int(lo) < 0 or int(hi) < 0 for lo, hi, _ in cfg):
        raise NotImplementedError("ONNX export: interior or negative padding")
    if not value.is_const:
        raise NotImplementedError("ONNX export: padding with a non-constant value")
    lo = [int(cfg[a][0]) for a in x.perm]
    hi = [int(cfg[a][1]) for a in x.perm]
    fill = c.g.const(value.const.astype(x.dtype).reshape(()))
    y = c.g.op("Pad", c.own(x), c.g.const(lo + hi), fill, mode="constant")
    return c.out(y, eqn.outvars[0], x.perm)


def _conv(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    x, w = ins
    p = eqn.params
    if not w.is_const:
        raise NotImplementedError("ONNX export: convolution with a non-constant kernel")
    if p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
        raise NotImplementedError("ONNX export: transposed or batch-grouped convolution")
    dn = p["dimension_numbers"]
    kernel = np.transpose(np.broadcast_to(w.const, w.shape), dn.rhs_spec)  # (O, I, *spatial)
    pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
    if any(v < 0 for v in pads):
        raise NotImplementedError("ONNX export: negative convolution padding")
    y = c.g.op(
        "Conv",
        c.in_perm(x, dn.lhs_spec, full=True),
        c.g.const(np.ascontiguousarray(kernel), "kernel"),
        group=int(p["feature_group_count"]),
        kernel_shape=list(kernel.shape[2:]),
        strides=[int(s) for s in p["window_strides"]],
        pads=pads,
        dilations=[int(d) for d in p["rhs_dilation"]],
    )
    return c.out(y, eqn.outvars[0], dn.out_spec)


def _dot_general(c: Converter, eqn: Any, ins: list[Val], uses: dict) -> Val:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    lf = [a for a in range(lhs.rank) if a not in lc + lb]
    rf = [a for a in range(rhs.rank) if a not in rc + rb]
    if len(lc) != 1 or lb != tuple(range(len(lb))) or rb != tuple(range(len(rb))):
        raise NotImplementedError(f"ONNX export: dot_general {eqn.params['dimension_numbers']}")
    # a 1x1 convolution: NHWC map x (C, O) weight -> Conv on NCHW
    if (rhs.is_const and rhs.rank == 2 and rc == (0,) and not lb and lhs.rank == 4
            and lc == (3,)):  # fmt: skip
        w = np.broadcast_to(rhs.const, rhs.shape).T[:, :, None, None]
        y = c.g.op("Conv", c.in_perm(lhs, (0, 3, 1, 2), full=True),
                   c.g.const(np.ascontiguousarray(w), "kernel"), kernel_shape=[1, 1])  # fmt: skip
        return c.out(y, eqn.outvars[0], (0, 3, 1, 2))
    nb = len(lb)
    if len(rf) > 1 or len(lf) > 1 and not (rhs.is_const and not lb):
        raise NotImplementedError(f"ONNX export: dot_general {eqn.params['dimension_numbers']}")
    # option A: lhs (b.., lf.., c) @ rhs (b.., c, rf) -> out stored in logical order
    a_l, a_r = (*lb, *lf, *lc), (*rb, *rc, *rf)
    nout = nb + len(lf) + len(rf)
    options = [(a_l, a_r, False, tuple(range(nout)))]
    if len(lf) == 1 and len(rf) == 1:  # option B: rhs (b, rf, c) @ lhs (b, c, lf) = out^T
        tperm = (*range(nb), nb + 1, nb)
        options.append(((*lb, *lc, *lf), (*rb, *rf, *rc), True, tperm))

    def cost(opt: tuple) -> tuple[int, int]:
        pl, pr, *_ = opt
        lt = int(not lhs.is_const and lhs.perm != pl)
        rt = int(not rhs.is_const and rhs.perm != pr)
        return (lt + rt, rt)

    pl, pr, swapped, operm = min(options, key=cost)
    a, b = c.in_perm(lhs, pl, full=True), c.in_perm(rhs, pr, full=True)
    y = c.g.op("MatMul", *((b, a) if swapped else (a, b)))
    return c.out(y, eqn.outvars[0], operm)


RULES: dict[str, Callable[..., Any]] = {
    **{p: _binary for p in BINARY},
    **{p: _unary for p in UNARY},
    "rsqrt": _unary,
    "integer_pow": _unary,
    "convert_element_type": _identity,
    "stop_gradient": _identity,
    "copy": _identity,
    "copy_p": _identity,
    "select_n": _select_n,
    "reduce_sum": _reduce,
    "reduce_max": _reduce,
    "reduce_min": _reduce,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "reshape": _reshape,
    "slice": _slice,
    "gather": _gather,
    "split": _split,
    "concatenate": _concatenate,
    "pad": _pad,
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
}


# ---- patterns ---------------------------------------------------------------------------------
def _chain(eqns: list, i: int, names: Sequence[str]) -> list | None:
    """``eqns[i:i+len(names)]`` if their primitives are ``names`` (``?name``: optional)."""
    out, j = [], i
    for n in names:
        opt = n.startswith("?")
        n = n.lstrip("?")
        if j < len(eqns) and eqns[j].primitive.name == n:
            out.append(eqns[j])
            j += 1
        elif not opt:
            return None
        else:
            out.append(None)
    return out


def match_softmax(eqns: list, i: int, uses: dict) -> tuple[int, Callable] | None:
    """``jax.nn.softmax``: reduce_max, [max -inf], broadcast, [stop_gradient], sub, exp,
    reduce_sum, broadcast, div -> ``Softmax``."""
    ch = _chain(eqns, i, ["reduce_max", "?max", "broadcast_in_dim", "?stop_gradient", "sub",
                          "exp", "reduce_sum", "broadcast_in_dim", "div"])  # fmt: skip
    if ch is None:
        return None
    rmax, mx, b1, sg, sub, ex, rsum, b2, div = ch
    x = rmax.invars[0]
    (axis,) = rmax.params["axes"] if len(rmax.params["axes"]) == 1 else (None,)
    m = rmax.outvars[0]
    if mx is not None:
        lit = [a for a in mx.invars if isinstance(a, jcore.Literal)]
        if not lit or float(lit[0].val) != -np.inf or m not in mx.invars:
            return None
        m = mx.outvars[0]
    ok = axis is not None and b1.invars[0] is m
    m = b1.outvars[0]
    if sg is not None:
        ok = ok and sg.invars[0] is m
        m = sg.outvars[0]
    ok = ok and sub.invars[0] is x and sub.invars[1] is m and ex.invars[0] is sub.outvars[0]
    e = ex.outvars[0]
    ok = ok and rsum.invars[0] is e and tuple(rsum.params["axes"]) == (axis,)
    ok = ok and b2.invars[0] is rsum.outvars[0] and div.invars[0] is e
    ok = ok and div.invars[1] is b2.outvars[0] and uses.get(e) == 2
    inner = [q.outvars[0] for q in ch[:-1] if q is not None and q is not ex]
    if not ok or any(uses.get(v, 0) != 1 for v in inner):
        return None

    def emit(c: Converter, env: dict, read: Callable) -> None:
        v = read(x)
        y = c.g.op("Softmax", c.own(v), axis=v.perm.index(axis))
        env[div.outvars[0]] = c.out(y, div.outvars[0], v.perm)

    return len([q for q in ch if q is not None]), emit


def match_mean(eqns: list, i: int, uses: dict, read: Callable) -> tuple[int, Callable] | None:
    """``reduce_sum`` over axes, [broadcast back as size 1], ``div`` by the element count ->
    ``ReduceMean`` (``keepdims`` when broadcast back)."""
    ch = _chain(eqns, i, ["reduce_sum", "?broadcast_in_dim", "div"])
    if ch is None:
        return None
    rsum, bc, div = ch
    x, axes = rsum.invars[0], tuple(rsum.params["axes"])
    cur = rsum.outvars[0]
    in_shape = aval_of(x)[0]
    keep = bc is not None
    if keep:
        out_shape = aval_of(bc.outvars[0])[0]
        kept = [a for a in range(len(in_shape)) if a not in axes]
        if (bc.invars[0] is not cur or tuple(bc.params["broadcast_dimensions"]) != tuple(kept)
                or any(out_shape[a] != 1 for a in axes)):  # fmt: skip
            return None
        cur = bc.outvars[0]
    if div.invars[0] is not cur or uses.get(cur, 0) != 1 or uses.get(rsum.outvars[0], 0) != 1:
        return None
    if isinstance(div.invars[1], jcore.Literal):
        den = np.asarray(div.invars[1].val)
    else:
        try:
            d = read(div.invars[1])
        except KeyError:
            return None
        if not d.is_const:
            return None
        den = d.const
    if den.size != 1 or any(is_symbolic(in_shape[a]) for a in axes):
        return None
    count = int(np.prod([in_shape[a] for a in axes]))
    if float(den.reshape(())) != float(count):
        return None

    def emit(c: Converter, env: dict, read: Callable) -> None:
        v = read(x)
        y, perm = _reduce_axes(c, "ReduceMean", v, axes, keep)
        env[div.outvars[0]] = c.out(y, div.outvars[0], perm)

    return (3 if keep else 2), emit


def convert_closed_jaxpr(
    closed: Any,
    inputs: Sequence[Val],
    graph: GraphBuilder,
    *,
    opset: int,
    batch: Any = None,
) -> list[Val]:
    """Convert ``closed`` applied to ``inputs`` into ``graph``; returns the outputs as plain
    tensors in logical axis order (transposed and broadcast where needed)."""
    c = Converter(graph, opset, batch)
    outs = c.convert(closed, list(inputs))
    return [tensor(c.in_perm(v, range(v.rank), full=True), v.shape, v.dtype) for v in outs]
