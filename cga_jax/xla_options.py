"""XLA compiler options for cga_jax's training step (``jax.jit(..., compiler_options=...)``).

On XLA-CPU, recent jaxlibs hand reductions and elementwise fusions to YNNPACK. For this model's
training step that was slower: BatchNorm statistics, depthwise-kernel gradients and their
producers became separate YNNPACK calls that each wrote their input to memory first. Keeping
YNNPACK for matmuls only (``LIBRARY_FUSION_TYPE_DOT``) made the M0 training step (batch 64, two
threads) ~10-20% faster in A/B runs in one process (docs/bench.md). The folded *inference*
forward went the other way (M0, batch 16, one thread: 156 vs 188 img/s, and 40% longer to
compile), so cga_jax passes these options to its training step only. Other backends get none.
Pass :func:`compiler_options` to your own ``jax.jit`` of a cga_jax training step for the same.
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
