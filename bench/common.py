"""Shared by the parent and the worker processes: inputs, recipe constants, memory probes."""

from __future__ import annotations

import resource

import numpy as np

IMG = 224
NUM_CLASSES = 1000
LR = 1e-3  # AdamW, both frameworks, weight decay on every parameter
WEIGHT_DECAY = 0.05
# Share of the GPU's memory each accelerator worker may take (JAX's XLA_PYTHON_CLIENT_MEM_FRACTION,
# torch's set_per_process_memory_fraction): the JAX and PyTorch processes are alive together.
GPU_MEM_FRACTION = 0.45
DISTINCT_IMAGES = 64  # larger batches repeat these (the values of a batch <= 64 do not change)


def inputs_nhwc(batch: int, img: int = IMG) -> np.ndarray:
    """The fixed benchmark input, (batch, img, img, 3) float32; NCHW users transpose it.

    At most :data:`DISTINCT_IMAGES` random images, repeated for larger batches: drawing 2048
    images would take seconds per contestant and measure nothing more."""
    n = min(batch, DISTINCT_IMAGES)
    x = np.random.RandomState(0).standard_normal((n, img, img, 3)).astype(np.float32)
    return x if n == batch else np.resize(x, (batch, img, img, 3))


def inputs_nchw(batch: int, img: int = IMG) -> np.ndarray:
    return np.ascontiguousarray(inputs_nhwc(batch, img).transpose(0, 3, 1, 2))


def labels(batch: int) -> np.ndarray:
    return np.random.RandomState(1).randint(0, NUM_CLASSES, size=batch).astype(np.int32)


def maxrss_mib() -> float:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    """This process's current resident set size."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
