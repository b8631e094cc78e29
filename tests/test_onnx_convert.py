"""The jaxpr -> ONNX converter on small functions: numbers (ONNX Runtime vs JAX), graph shape
(which nodes it emits), dynamic batch, opsets and errors."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from plugin_helpers import randomize_nnx
from utils import assert_logits_close

import cga_jax
from cga_jax.attention import apply_in_windows
from cga_jax.onnx_export import function_to_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

RNG = np.random.RandomState(0)


def _session(proto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(proto, *inputs):
    sess = _session(proto)
    feed = {i.name: x for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feed)


def _ops(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _conv_nhwc(x, w, groups=1, stride=1, pad=1):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)  # fmt: skip


def test_conv_chain_stays_nchw():
    """NHWC convs (dense 3x3, depthwise, 1x1 as einsum + bias) with ReLUs between: one
    Transpose in, one out, every conv a Conv (the 1x1 one with the bias folded in)."""
    w1, w2, w3, b3 = _rand(3, 3, 3, 8), _rand(3, 3, 1, 8), _rand(8, 16), _rand(16)

    def f(x):
        y = jax.nn.relu(_conv_nhwc(x, w1, stride=2))
        y = jax.nn.relu(_conv_nhwc(y, w2, groups=8))
        return jnp.einsum("...c,co->...o", y, w3) + b3

    proto = function_to_onnx(f, [(None, 12, 10, 3)])
    ops = _ops(proto)
    assert ops["Conv"] == 3 and ops["Transpose"] == 2, ops
    assert not {"MatMul", "Einsum", "Add", "Expand"} & set(ops), ops
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert groups == [1, 8, 1]
    assert len(convs[2].input) == 3  # bias folded into the 1x1 conv
    x = _rand(3, 12, 10, 3)
    np.testing.assert_allclose(_run(proto, x)[0], f(x), rtol=1e-5, atol=1e-5)


def test_nchw_input_has_no_transpose():
    w = _rand(3, 3, 3, 4)
    proto = function_to_onnx(lambda x: jax.nn.relu(_conv_nhwc(x, w)), [(2, 8, 8, 3)],
                             nchw_inputs=(0,))  # fmt: skip
    assert _ops(proto)["Transpose"] == 1  # only the NHWC output
    x = _rand(2, 8, 8, 3)
    out = _run(proto, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))[0]
    np.testing.assert_allclose(out, jax.nn.relu(_conv_nhwc(x, w)), rtol=1e-5, atol=1e-5)


def test_softmax_and_mean_patterns():
    w = _rand(6, 5)

    def f(x):
        s = jax.nn.softmax(x @ w, axis=-1)
        return s, jnp.mean(x, axis=1), jnp.mean(x, axis=(0, 1), keepdims=True)

    proto = function_to_onnx(f, [(4, 6)])
    ops = _ops(proto)
    assert ops["Softmax"] == 1 and ops["ReduceMean"] == 2, ops
    assert not {"Exp", "ReduceMax", "ReduceSum", "Div"} & set(ops), ops
    x = _rand(4, 6)
    for got, ref in zip(_run(proto, x), f(x), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_reductions_each_opset(opset):
    """ReduceMax / ReduceMean take axes as an attribute before opset 18, an input from 18."""

    def f(x):
        return jnp.max(x, axis=-1) - jnp.sum(x, axis=-1), jnp.mean(x, axis=0)

    proto = function_to_onnx(f, [(3, 7)], opset=opset)
    assert proto.opset_import[0].version == opset
    x = _rand(3, 7)
    for got, ref in zip(_run(proto, x), f(x), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_slices_and_reshapes():
    """With a symbolic batch JAX lowers ``x[..., a:b]`` to a gather: it must come out as a
    Slice, and reshapes that merge the batch use -1."""

    def f(x):
        q, k = x[..., :4], x[..., 4:8]
        y = (q * k).reshape(x.shape[0] * x.shape[1], 4)
        return y.reshape(x.shape[0], x.shape[1], 4).sum(axis=1)

    proto = function_to_onnx(f, [(None, 5, 8)])
    ops = _ops(proto)
    assert "Gather" not in ops and ops["Slice"] == 2, ops
    for b in (1, 6):
        x = _rand(b, 5, 8)
        np.testing.assert_allclose(_run(proto, x)[0], f(x), rtol=1e-5, atol=1e-5)


def test_windows_with_padding():
    """apply_in_windows on a map that is not a multiple of the window: Pad, partition,
    reassembly and crop, under a dynamic batch."""
    w = _rand(3, 3, 1, 6)

    def f(x):
        return apply_in_windows(lambda t: _conv_nhwc(t, w, groups=6) * 2.0, x, 4)

    proto = function_to_onnx(f, [(None, 10, 9, 6)])
    assert _ops(proto)["Pad"] == 1
    for b in (1, 3):
        x = _rand(b, 10, 9, 6)
        np.testing.assert_allclose(_run(proto, x)[0], f(x), rtol=1e-5, atol=1e-5)


def test_batched_matmuls():
    def f(q, k, v):
        a = jnp.einsum("bnc,bmc->bnm", q, k)
        return jnp.einsum("bnm,bmc->bnc", jax.nn.softmax(a, -1), v)

    proto = function_to_onnx(f, [(None, 9, 4)] * 3)
    assert _ops(proto)["MatMul"] == 2
    q, k, v = _rand(2, 9, 4), _rand(2, 9, 4), _rand(2, 9, 4)
    np.testing.assert_allclose(_run(proto, q, k, v)[0], f(q, k, v), rtol=1e-5, atol=1e-5)


def test_broadcast_to_dynamic_batch():
    """A constant broadcast to (batch, n) and reshaped must be expanded at run time."""
    c = _rand(1, 3)

    def f(x):
        return jnp.broadcast_to(c, (x.shape[0], 3)).reshape(-1) + x.reshape(-1)

    proto = function_to_onnx(f, [(None, 3)])
    assert _ops(proto)["Expand"] == 1
    for b in (1, 4):
        x = _rand(b, 3)
        np.testing.assert_allclose(_run(proto, x)[0], f(x), rtol=1e-6)


def test_local_window_attention_alone():
    """The attention layer a user plugs into their own network, exported on its own: bias
    gather folded into a constant, maps that need padding, dynamic batch."""
    attn = nnx.eval_shape(lambda: cga_jax.LocalWindowAttention(32, 8, 4, window_resolution=5,
                                                               kernels=[5, 3, 3, 1],
                                                               rngs=nnx.Rngs(0)))  # fmt: skip
    randomize_nnx(attn)
    graphdef, state = nnx.split(cga_jax.set_impl(cga_jax.fuse_bn(attn), "standard"))

    def f(x):
        return nnx.merge(graphdef, state)(x)

    proto = function_to_onnx(f, [(None, 7, 12, 32)])
    ops = _ops(proto)
    assert "Gather" not in ops and ops["Softmax"] == 4, ops
    biases = [t for t in proto.graph.initializer if tuple(t.dims[-2:]) == (25, 25)]
    assert len(biases) == 4  # one (1, 25, 25) bias per head, gathered at export
    x = _rand(2, 7, 12, 32)
    ref = np.asarray(jax.jit(f)(x))
    assert_logits_close(_run(proto, x)[0], ref, "LocalWindowAttention")


def test_unsupported_primitive_is_named():
    with pytest.raises(NotImplementedError, match="cumsum"):
        function_to_onnx(lambda x: jnp.cumsum(x, axis=1), [(2, 5)])


def test_bad_arguments():
    with pytest.raises(ValueError, match="opset"):
        function_to_onnx(lambda x: x + 1, [(2, 3)], opset=16)
    with pytest.raises(ValueError, match="rank-4"):
        function_to_onnx(lambda x: x + 1, [(2, 3)], nchw_inputs=(0,))
