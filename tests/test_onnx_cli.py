"""``cga-jax export``: --format onnx (parity of the written graph with the official fused
logits), --format jax --platforms (a multi-platform jax.export artifact), --quantize int8
(slow), and bad input: one clear error, exit status 2, nothing written."""

from __future__ import annotations

import os

import numpy as np
import pytest
from utils import assert_logits_close

from cga_jax.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_onnx_official_m0(fixtures_dir, tmp_path, capsys):
    pytest.importorskip("torch")  # the .pth fixture is read with torch.load(weights_only=True)
    z = np.load(fixtures_dir / "official_m0.npz", allow_pickle=False)
    out = tmp_path / "m0.onnx"
    argv = ["export", "--model", "efficientvit_m0", "--weights",
            str(fixtures_dir / "official_m0.pth"), "--format", "onnx", "--layout", "nchw",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "ONNX opset 17" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    sess = _session(out)
    x = np.ascontiguousarray(z["input"])  # (2, 3, 224, 224): NCHW as the official model
    assert_logits_close(sess.run(None, {"input": x})[0], z["logits_fused"], "ORT vs official")
    assert [os.path.basename(p) for p in tmp_path.iterdir()] == ["m0.onnx"]  # no temp left


def test_export_jax_platforms(tmp_path, capsys):
    from jax import export

    out = tmp_path / "m0.jax"
    argv = ["export", "--model", "efficientvit_m0", "--format", "jax",
            "--platforms", "cpu,cuda,tpu", "--img-size", "96", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "input (b, 96, 96, 3) NHWC" in capsys.readouterr().out
    exp = export.deserialize(bytearray(out.read_bytes()))
    assert tuple(exp.platforms) == ("cpu", "cuda", "tpu")
    assert exp.in_avals[0].shape[1:] == (96, 96, 3)
    logits = np.asarray(exp.call(np.zeros((2, 96, 96, 3), np.float32)))
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()


@pytest.mark.slow
def test_export_onnx_int8(fixtures_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    from bench.synthetic import write_images

    write_images(tmp_path / "calib", 16, seed=0, sizes=(160, 260))
    out = tmp_path / "m0_int8.onnx"
    argv = ["export", "--model", "efficientvit_m0", "--weights",
            str(fixtures_dir / "official_m0.pth"), "--format", "onnx", "--batch", "1",
            "--quantize", "int8", "--calib", str(tmp_path / "calib"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "int8 QDQ, calibrated on 16 images" in capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = np.zeros((1, 224, 224, 3), np.float32)
    assert _session(out).run(None, {"input": x})[0].shape == (1, 1000)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "jax", "--batch", "4"], "--batch applies to --format onnx only"),
        (["--format", "onnx", "--platforms", "cpu"], "--platforms applies to --format jax"),
        (["--format", "onnx", "--quantize", "int8"], "needs --calib DIR"),
        (["--format", "onnx", "--calib", "x"], "only used with --quantize"),
        (["--format", "onnx", "--quantize", "int8", "--calib", "{tmp}/nope"], "no such directory"),
        (["--format", "onnx", "--out", "{tmp}/missing/m.onnx"], "cannot write there"),
        (["--format", "onnx", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, message):
    argv = ["export", "--model", "efficientvit_m0", "--out", str(tmp_path / "m.onnx")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "efficientvit_m0", "--format", "tflite", "--out", "x"])
    assert e.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_weights_not_matching_model(fixtures_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "m1.onnx"
    argv = ["export", "--model", "efficientvit_m1", "--weights",
            str(fixtures_dir / "official_m0.pth"), "--format", "onnx", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "looks like efficientvit_m0" in err
    assert list(tmp_path.iterdir()) == []
