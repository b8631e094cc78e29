"""XLA compiler options for cga_jax's jits (``jax.jit(..., compiler_options=...)``).

On XLA-CPU, jaxlib 0.10 hands matmuls, reductions and dense convolutions to YNNPACK by default.
Two of those were slow for this model: YNNPACK's reductions took their input materialised (every
BatchNorm statistic and depthwise-kernel gradient of the training step became a write + read),
and its convolutions ran on one thread whatever the thread pool (the stem's 3x3 stride-2 convs:
18 / 13 / 11 ms at batch 64 on two threads, against 9 / 6 / 5 ms through XLA's own convolution).
:data:`CPU_OPTIONS` keeps YNNPACK for individual matmuls only
(``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``). Measured on a 2-core AVX-512 VM (docs/bench.md): the folded forward at batch 64 on two threads
went from 690 to 755 img/s (M0) and from 315 to 364 img/s (M4); at batch 16 on one thread
548 -> 584 (M0) and unchanged (M4); the first call got faster too. The training step runs as
fast as with matmuls-and-fusions (``LIBRARY_FUSION_TYPE_DOT``), which was ~10-20% faster than
the default. cga_jax passes these options to its training and evaluation steps, and the
benchmark to every cga_jax function; pass :func:`compiler_options` to your own ``jax.jit`` of a
cga_jax model for the same. Other backends get none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


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
