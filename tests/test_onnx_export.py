"""cga_jax.export_onnx: parity of the exported graph in ONNX Runtime with the official fused
logits (fixtures), with cga_jax and with timm (live oracle, slow); batch independence; what the
graph is made of; bad arguments."""

from __future__ import annotations

import ast
import collections
import os

import jax
import numpy as np
import pytest
from flax import nnx
from utils import assert_logits_close

import cga_jax
from cga_jax.errors import CheckpointError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ALLOWED_OPS = {"Conv", "MatMul", "Add", "Mul", "Relu", "Sigmoid", "Softmax", "Reshape",
               "Transpose", "Slice", "Split", "Concat", "ReduceMean", "Pad", "Identity"}  # fmt: skip


def session(proto_or_path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = proto_or_path.SerializeToString() if hasattr(proto_or_path, "graph") else proto_or_path
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x)})[0]


def jax_logits(model, x):
    folded = cga_jax.fuse_bn(model)
    graphdef, state = nnx.split(folded)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))


def official(fixtures_dir, case):
    pytest.importorskip("torch")  # the .pth fixtures are read with torch.load(weights_only=True)
    z = np.load(fixtures_dir / f"{case}.npz", allow_pickle=False)
    path = fixtures_dir / f"{case}.pth"
    if case == "official_m0":
        model = cga_jax.create_model("efficientvit_m0", pretrained=path)
    else:
        cfg = cga_jax.EfficientViTConfig(**ast.literal_eval(str(z["config"])))
        model = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))
        cga_jax.loading.load_pretrained(model, path)
    model.eval()
    return z, model


@pytest.fixture(scope="module")
def m0(fixtures_dir):
    """The official M0 fixture, exported once (dynamic batch, NHWC, opset 17)."""
    z, model = official(fixtures_dir, "official_m0")
    proto = cga_jax.export_onnx(model)
    return z, model, proto, session(proto)


def test_m0_matches_official_fused_logits(m0):
    z, model, _, sess = m0
    x = z["input"].transpose(0, 2, 3, 1)
    assert np.abs(z["logits_fused"]).max() > 1.0  # well scaled
    out = run(sess, x)
    assert_logits_close(out, z["logits_fused"], "ONNX Runtime vs official fused")
    assert_logits_close(out, jax_logits(model, x), "ONNX Runtime vs cga_jax")


def test_m0_batch_1_and_7_give_the_same_rows(m0):
    z, _, _, sess = m0
    rng = np.random.RandomState(7)
    x = np.concatenate([z["input"].transpose(0, 2, 3, 1)] * 4)[:7]
    x = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    together = run(sess, x)
    assert together.shape == (7, 1000)
    for i in range(7):
        assert_logits_close(run(sess, x[i : i + 1])[0], together[i], f"row {i}")
    assert np.abs(together[0] - together[1]).max() > 1e-2  # the rows really differ


def test_m0_graph_is_clean(m0):
    """Every conv of the model is one Conv node (depthwise: group = channels, 1x1: a 1x1
    kernel with its bias), the attention products are MatMuls, the bias lookup is folded."""
    _, model, proto, _ = m0
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert set(ops) <= ALLOWED_OPS, set(ops) - ALLOWED_OPS
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, cga_jax.layers.Conv2d)]
    assert ops["Conv"] == len(convs)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type == "Conv"]  # fmt: skip
    assert sorted(a.get("group", 1) for a in attrs) == sorted(m.groups for m in convs)
    assert sum(a["kernel_shape"] == [1, 1] for a in attrs) == sum(m.kernel_size == 1 for m in convs)
    heads = sum(d * h for d, h in zip(model.cfg.depth, model.cfg.num_heads, strict=True))
    assert ops["Softmax"] == heads and ops["MatMul"] == 2 * heads + 1  # + the classifier
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    slices = [n for n in proto.graph.node if n.op_type == "Slice"]
    assert all(producers.get(n.input[0]) == "Conv" for n in slices)  # q/k/v of a qkv conv only
    assert ops["Slice"] == 3 * heads
    inputs = proto.graph.input
    assert [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim] == [
        "batch",
        224,
        224,
        3,
    ]


def test_m0_non_square_nchw(m0):
    """Another input size (windows padded), NCHW input: ORT == cga_jax."""
    z, model, _, _ = m0
    proto = cga_jax.export_onnx(model, img_size=(200, 168), input_layout="NCHW")
    x = np.random.RandomState(3).standard_normal((2, 200, 168, 3)).astype(np.float32)
    out = run(session(proto), x.transpose(0, 3, 1, 2))
    assert_logits_close(out, jax_logits(model, x), "200x168 NCHW vs cga_jax")


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return official(fixtures_dir, "official_tiny")


@pytest.mark.parametrize("batch,opset", [(None, 18), (2, 17), (2, 21)])
def test_tiny_official(tiny, batch, opset):
    """Padded windows and per-head kernel sizes; fixed and dynamic batch; several opsets."""
    z, model = tiny
    proto = cga_jax.export_onnx(model, batch=batch, opset=opset)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim.dim_param or dim.dim_value) == (batch or "batch")
    out = run(session(proto), z["input"].transpose(0, 2, 3, 1))
    assert_logits_close(out, z["logits_fused"], f"tiny batch={batch} opset={opset}")


def test_export_writes_file_and_leaves_model_alone(tiny, tmp_path):
    _, model = tiny
    before = nnx.state(model)
    path = tmp_path / "tiny.onnx"
    proto = cga_jax.export_onnx(model, path, fuse=False)
    assert onnx.load(str(path)) == proto
    assert os.listdir(tmp_path) == ["tiny.onnx"]
    assert all(m.impl == "auto" for _, m in nnx.iter_modules(model) if hasattr(m, "impl"))
    assert model.patch_embed.conv1.bn is not None
    jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model))


def test_bad_arguments(tiny, tmp_path):
    _, model = tiny
    for kwargs, match in [
        ({"opset": 16}, "opset"),
        ({"batch": 0}, "batch"),
        ({"input_layout": "CHW"}, "input_layout"),
        ({"img_size": "80y80"}, "image size"),
    ]:
        with pytest.raises(ValueError, match=match):
            cga_jax.export_onnx(model, **kwargs)
    with pytest.raises(CheckpointError, match="cannot write"):
        cga_jax.export_onnx(model, tmp_path / "missing" / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_read_only_directory(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(CheckpointError, match="cannot write"):
            cga_jax.export_onnx(tiny[1], ro / "m.onnx")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


# ---- M1-M5 against the live oracle (timm, random calibrated weights) -------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", [f"efficientvit_m{i}" for i in range(1, 6)])
def test_variant_parity_with_timm(name):
    torch_ref = pytest.importorskip("torch_ref")
    tm, jm = torch_ref.timm_and_cga_pair(name, seed=int(name[-1]))
    proto = cga_jax.export_onnx(jm)
    sess = session(proto)
    x = np.random.RandomState(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    assert np.abs(ref).max() > 1.0
    out = run(sess, x)
    assert_logits_close(out, ref, f"{name} ORT vs timm")
    assert_logits_close(out, jax_logits(jm, x), f"{name} ORT vs cga_jax")
    for i in range(2):
        assert_logits_close(run(sess, x[i : i + 1])[0], out[i], f"{name} row {i}")
    xs = np.random.RandomState(2).standard_normal((2, 192, 256, 3)).astype(np.float32)
    out = run(session(cga_jax.export_onnx(jm, img_size="192x256")), xs)
    assert_logits_close(out, torch_ref.run_nchw(tm, xs), f"{name} 192x256 ORT vs timm")
