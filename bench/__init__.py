"""Benchmark harness: cga_jax vs PyTorch (timm) and ONNX Runtime, on the CPU and on a GPU.

Entry points: ``python -m bench.run`` (``make bench``; ``--only gpu`` for the accelerator
section) and ``bash bench/device_check.sh`` (a bare GPU machine); see ``docs/bench.md``.
"""
