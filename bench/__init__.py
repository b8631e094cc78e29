"""Benchmark harness: cga_jax vs PyTorch (timm) and ONNX Runtime on CPU.

Entry point: ``python -m bench.run`` (``make bench``); see ``docs/bench.md``.
"""
