"""XLA compiler options for cga_jax's jitted functions (``jax.jit(..., compiler_options=...)``).

On XLA-CPU, recent jaxlibs hand reductions and elementwise fusions to YNNPACK. For this model's
training step that was slower: BatchNorm statistics, depthwise-kernel gradients and their
producers became separate YNNPACK calls that each wrote their input to memory first. Keeping
YNNPACK for matmuls only (``LIBRARY_FUSION_TYPE_DOT``) made the M0 training step (batch 64, two
threads) ~15-25% faster in A/B runs in one process (docs/bench.md). Other backends get no
options. Pass :func:`compiler_options` to your own ``jax.jit`` of a cga_jax model to get the same.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib knows the options (older ones reject unknown names at compile)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(dict(CPU_OPTIONS))
    except Exception:  # noqa: BLE001 - any rejection means: don't pass them
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """Options for ``jax.jit(..., compiler_options=...)``: :data:`CPU_OPTIONS` on CPU, else None.

    ``backend`` defaults to ``jax.default_backend()`` (which initialises JAX's backends: call it
    after ``jax.distributed.initialize``).
    """
    if (backend or jax.default_backend()) != "cpu" or not _cpu_options_supported():
        return None
    return dict(CPU_OPTIONS)
