"""int8 static quantization (QDQ) of an exported graph: it runs, is calibrated from a folder
of images, and keeps the float model's top-1 on most images."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from flax import nnx
from plugin_helpers import randomize_nnx

import cga_jax
from bench.synthetic import condition_, write_images
from cga_jax.onnx_quantize import load_image, quantize_int8

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY = dict(
    img_size=80,
    embed_dim=(16, 24, 32),
    key_dim=(4, 4, 4),
    depth=(1, 1, 2),
    num_heads=(4, 2, 2),
    window_size=(3, 3, 3),
    kernels=(7, 5, 3, 3),
    num_classes=10,
)  # fmt: skip  (the official_tiny fixture's configuration)
# Bound of the agreement test: this test has printed 0.83 (50 of the 60 images); the bound
# leaves room for other CPUs (ORT's int8 kernels differ by instruction set).
MIN_TOP1_AGREEMENT = 0.6


def _images(folder):
    return np.stack([load_image(p, (80, 80)) for p in sorted(folder.iterdir())])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    write_images(root / "calib" / "a", 24, seed=1, sizes=(90, 140))  # nested: any depth is searched
    (root / "calib" / "notes.txt").write_text("not an image")
    (root / "calib" / "broken.png").write_bytes(b"not a png")
    write_images(root / "eval", 60, seed=2, sizes=(90, 140))
    model = nnx.eval_shape(lambda: cga_jax.EfficientViT(cga_jax.EfficientViTConfig(**TINY),
                                                        rngs=nnx.Rngs(0)))  # fmt: skip
    randomize_nnx(model, seed=3)
    condition_(model, _images(root / "calib" / "a"))
    proto = cga_jax.export_onnx(model)
    return root, proto


def _run(proto, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_int8_runs_and_keeps_top1(setup, tmp_path):
    root, proto = setup
    path = tmp_path / "int8.onnx"
    q = quantize_int8(proto, root / "calib", path)
    assert onnx.load(str(path)) == q
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert all(producers[n.input[0]] == producers[n.input[1]] == "DequantizeLinear"
               for n in convs)  # fmt: skip
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["calibration_images"] == "24"  # the readable ones; text and broken PNG skipped
    x = _images(root / "eval")
    ref, got = _run(proto, x), _run(q, x)
    assert len(set(ref.argmax(1))) >= 5  # the predictions vary: agreement means something
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    print(f"int8 top-1 agreement {agree:.3f}")
    assert agree >= MIN_TOP1_AGREEMENT, f"top-1 agreement {agree:.2f}"
    assert 0 < np.abs(got - ref).max() < np.abs(ref).max()  # quantized, not broken


def test_fixed_batch_nchw_graph(setup, tmp_path):
    """Calibration batches follow the graph: fixed batch 4, NCHW input."""
    root, _ = setup
    model = nnx.eval_shape(lambda: cga_jax.EfficientViT(cga_jax.EfficientViTConfig(**TINY),
                                                        rngs=nnx.Rngs(0)))  # fmt: skip
    randomize_nnx(model, seed=3)
    model.eval()
    proto = cga_jax.export_onnx(model, batch=4, input_layout="NCHW")
    q = quantize_int8(proto, root / "calib", max_images=10)
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["calibration_images"] == "8"  # two full batches of 4 out of 10 images
    x = _images(root / "eval")[:4].transpose(0, 3, 1, 2)
    assert _run(q, np.ascontiguousarray(x)).shape == (4, 10)


def test_calibration_folder_errors(setup, tmp_path):
    _, proto = setup
    with pytest.raises(FileNotFoundError, match="no such directory"):
        quantize_int8(proto, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        quantize_int8(proto, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match="readable"):
        quantize_int8(proto, tmp_path / "bad", tmp_path / "out.onnx")
    assert not os.path.exists(tmp_path / "out.onnx")
