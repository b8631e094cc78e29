"""int8 post-training quantization of an exported graph with ONNX Runtime (static, QDQ format),
calibrated on a folder of images with the official evaluation preprocessing.

Needs the ``onnx`` extra (``onnxruntime.quantization``). See docs/deploy.md for the speed-up and
the agreement with the float model.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cga_jax.checkpoint_io import atomic_write_bytes
from cga_jax.preprocess import IMAGE_EXTS, decode_image, eval_preprocess, normalize

QUANT_OPS = ("Conv",)  # ~all FLOPs; attention matmuls and softmax stay float (accuracy)
CALIB_BATCH = 8  # images per calibration run of a dynamic-batch graph


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Image files anywhere under ``folder`` (by extension, sorted)."""
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (calibration images)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(
            f"{root}: no images for calibration (extensions: {', '.join(IMAGE_EXTS)})"
        )
    return files


def load_image(path: str | os.PathLike, img_hw: tuple[int, int], crop_pct: float = 0.875):
    """Decoded, evaluation-preprocessed, normalised float32 (H, W, 3); None if unreadable.
    A square size is exactly the official transform; for H != W the image is preprocessed at
    max(H, W) and centre-cropped to H x W."""
    img = decode_image(path)
    if img is None:
        return None
    h, w = img_hw
    side = max(h, w)
    img = eval_preprocess(img, side, crop_pct)
    top, left = (side - h) // 2, (side - w) // 2
    return normalize(img[top : top + h, left : left + w][None])[0]


def calibration_batches(
    files: Sequence[pathlib.Path],
    img_hw: tuple[int, int],
    *,
    batch: int,
    nchw: bool,
    crop_pct: float = 0.875,
) -> Iterator[np.ndarray]:
    """Batches (batch, H, W, 3) (or NCHW) of the readable images; a last partial batch is
    dropped. Unreadable files are skipped."""
    buf = []
    for path in files:
        x = load_image(path, img_hw, crop_pct)
        if x is None:
            continue
        buf.append(x.transpose(2, 0, 1) if nchw else x)
        if len(buf) == batch:
            yield np.ascontiguousarray(np.stack(buf))
            buf = []


def graph_input(proto: Any) -> tuple[str, int | None, tuple[int, int], bool]:
    """(input name, fixed batch or None, (H, W), NCHW?) of an exported graph."""
    meta = {p.key: p.value for p in proto.metadata_props}
    inp = proto.graph.input[0]
    dims = [
        d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim
    ]
    nchw = meta.get("input_layout", "NHWC") == "NCHW"
    h, w = (dims[2], dims[3]) if nchw else (dims[1], dims[2])
    return inp.name, dims[0], (int(h), int(w)), nchw


def quantize_int8(
    proto: Any,
    calib_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    max_images: int = 128,
    crop_pct: float = 0.875,
    op_types: Sequence[str] = QUANT_OPS,
    per_channel: bool = True,
) -> Any:
    """Static int8 quantization (QDQ) of an exported float graph; returns the quantized
    ``onnx.ModelProto`` and writes it atomically to ``path`` if given.

    Calibration (min/max of every quantized tensor) runs the float graph on up to
    ``max_images`` images found under ``calib_dir`` (any depth), preprocessed as in
    evaluation for the graph's input size and layout. Weights: int8 per output channel;
    activations: uint8 per tensor (the fast pair on x86, integer ``Conv`` with VNNI).
    Only ``op_types`` are quantized (default: ``Conv``).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    files = list_images(calib_dir)[:max_images]
    name, fixed, img_hw, nchw = graph_input(proto)
    batch = fixed or min(CALIB_BATCH, len(files))
    batches = calibration_batches(files, img_hw, batch=batch, nchw=nchw, crop_pct=crop_pct)
    first = next(batches, None)
    if first is None:
        raise FileNotFoundError(
            f"{calib_dir}: fewer than {batch} readable images (the graph's calibration batch)"
        )
    batches = itertools.chain([first], batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(batches, None)
            if x is None:
                return None
            self.count += len(x)
            return {name: x}

    reader = Reader()
    with tempfile.TemporaryDirectory(prefix="cga-int8-") as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(proto, src)
        quantize_static(
            src,
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax keeps one (min, max) pair per tensor and batch: small. (Not
            # CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the data it flushes.)
            calibrate_method=CalibrationMethod.MinMax,
        )
        out = onnx.load(dst)
    meta = {p.key: p.value for p in out.metadata_props}
    for k, v in {"quantization": "int8 static QDQ (onnxruntime)",
                 "calibration_images": str(reader.count)}.items():  # fmt: skip
        if k not in meta:
            out.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(out)
    if path is not None:
        atomic_write_bytes(path, out.SerializeToString())
    return out
