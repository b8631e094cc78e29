"""ONNX Runtime side: the ONNX export of the BN-fused timm model (made by ``bench.prepare``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import inputs_nchw
from bench.worker_api import Task


def setup(proc: dict[str, Any]) -> dict[str, Any]:
    return {"onnxruntime": ort.__version__}


def build(spec: dict[str, Any]) -> Task:
    if spec["task"] != "infer":
        raise ValueError("onnxruntime runs inference only")
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: inputs_nchw(spec["batch"])}

    def step() -> np.ndarray:
        return sess.run(None, feed)[0]

    info = {"intra_op_num_threads": spec["threads"], "providers": sess.get_providers()}
    return Task(step=step, images_per_step=spec["batch"], info=info)


def is_oom(exc: BaseException) -> bool:
    return False


def release() -> None:
    """Nothing held beyond the session, which the caller drops."""


def reset_peak_memory() -> None:
    """CPU only: the process's peak RSS is the measure."""


def device_memory() -> dict[str, Any]:
    return {}
