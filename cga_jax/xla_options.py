"""XLA compiler options for cga_jax's jits (``jax.jit(..., compiler_options=...)``).

On XLA-CPU, jaxlib 0.10 hands matmuls, reductions and dense convolutions to YNNPACK by default.
None of the three paid off for this model: YNNPACK's reductions took their input materialised
(every BatchNorm statistic and depthwise-kernel gradient of the training step became a write +
read), its convolutions ran on one thread whatever the thread pool (the stem's 3x3 stride-2 convs:
18 / 13 / 11 ms at batch 64 on two threads, against 9 / 6 / 5 ms through XLA's own convolution),
and its matmuls were slower than XLA's own (Eigen) dot on the 1x1-conv shapes of EfficientViT.
:data:`CPU_OPTIONS` therefore turns YNNPACK off (an empty ``xla_cpu_experimental_ynn_fusion_type``).
Measured on a 2-core AVX-512 VM (docs/bench.md), folded forward, batch 16, one thread, against
YNNPACK for individual matmuls only: M0 31.5 -> 30.3 ms, M1 52.7 -> 49.9, M3 74.8 -> 69.4, M5
128.6 -> 119.8; batch 64 on two threads M0 81.8 -> 80.8 ms, M4 210.8 -> 204.8; the M0 training
step the same or ~2% faster. Against jaxlib's default (everything to YNNPACK) the folded forward
at batch 64 on two threads had already gone from 690 to 755 img/s (M0) and 315 to 364 (M4) with
matmuls-only. Every jit of cga_jax uses these options (the trainer's steps, :func:`jit` for
``evaluate``/``predict``), and so does the benchmark; pass :func:`compiler_options` to your own
``jax.jit`` of a cga_jax model for the same. Other backends get none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions


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


def jit(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)``, built at the first call.

    For module-level jitted functions (usable as ``@jit`` or ``@jit(static_argnames=...)``):
    :func:`compiler_options` asks for the default backend, which must not happen at import time
    (before ``jax.distributed.initialize``).
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)

    @functools.cache
    def build() -> Callable:
        return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        return build()(*args, **kwargs)

    call.jitted = build  # the underlying jax.jit function (built on first use)
    return call
