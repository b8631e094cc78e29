"""A minimal ONNX graph builder: nodes and initializers are collected as plain Python/numpy and
turned into an ``onnx.ModelProto`` only by :meth:`GraphBuilder.to_model` (the one place that
imports ``onnx``, an optional dependency)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

Dim = int | str  # a graph input/output dimension: a size or a symbolic name ("batch")
# numpy dtype -> ONNX TensorProto data type (the values of onnx.TensorProto.DataType)
TENSOR_TYPES = {
    np.dtype(k): v
    for k, v in (
        ("float32", 1),
        ("uint8", 2),
        ("int8", 3),
        ("int32", 6),
        ("int64", 7),
        ("bool", 9),
        ("float16", 10),
        ("float64", 11),
    )
}


@dataclasses.dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    domain: str = ""


class GraphBuilder:
    """Collects nodes and initializers; names are unique and readable (``conv_12``)."""

    SMALL = 64  # constants up to this many elements are shared between uses

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._counter = itertools.count()
        self._small: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> list[str]:
        """Append ``op(inputs)``; returns its ``n_out`` output names. ``""`` is an omitted
        optional input."""
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(Node(op, list(inputs), outs, attrs))
        return outs

    def op(self, op: str, *inputs: str, **attrs: Any) -> str:
        """A single-output node; returns the output name."""
        return self.node(op, inputs, 1, **attrs)[0]

    def const(self, value: np.ndarray | Sequence[int] | float, hint: str = "const") -> str:
        """An initializer holding ``value`` (lists become int64); small ones are shared."""
        arr = np.asarray(value, np.int64) if isinstance(value, list | tuple) else np.asarray(value)
        if arr.size <= self.SMALL:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._small:
                return self._small[key]
        name = self.fresh(hint)
        self.initializers[name] = np.ascontiguousarray(arr)
        if arr.size <= self.SMALL:
            self._small[key] = name
        return name

    def producer(self, name: str) -> Node | None:
        """The node whose (first) output is ``name``, if it is the last one built with it."""
        for node in reversed(self.nodes):
            if name in node.outputs:
                return node
        return None

    def to_model(
        self,
        inputs: Sequence[tuple[str, np.dtype, Sequence[Dim]]],
        outputs: Sequence[tuple[str, np.dtype, Sequence[Dim]]],
        *,
        opset: int,
        graph_name: str,
        doc: str = "",
        metadata: dict[str, str] | None = None,
    ):
        """The ``onnx.ModelProto`` (nodes in the order built, which is topological)."""
        from onnx import helper, numpy_helper

        def value_info(name: str, dtype: np.dtype, shape: Sequence[Dim]):
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            return helper.make_tensor_value_info(name, elem, list(shape))

        used = {i for n in self.nodes for i in n.inputs}
        nodes = [
            helper.make_node(n.op, n.inputs, n.outputs, name=n.outputs[0], domain=n.domain,
                             **n.attrs)
            for n in self.nodes
        ]  # fmt: skip
        inits = [numpy_helper.from_array(a, name) for name, a in self.initializers.items()
                 if name in used]  # fmt: skip
        graph = helper.make_graph(
            nodes,
            graph_name,
            [value_info(*i) for i in inputs],
            [value_info(*o) for o in outputs],
            initializer=inits,
            doc_string=doc,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="cga_jax")
        model.ir_version = helper.find_min_ir_version_for(opsets)  # oldest runtime that can read it
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=v)
        return model
