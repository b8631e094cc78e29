"""XLA compiler options for cga_jax's jits (``jax.jit(..., compiler_options=...)``).

On XLA-CPU, jaxlib 0.10 hands matmuls, reductions and dense convolutions to YNNPACK by default.
Two of those were slow for this model: YNNPACK's reductions took their input materialised (every
BatchNorm statistic and depthwise-kernel gradient of the training step became a write + read),
and its convolutions ran on one thread whatever the thread pool (the stem's 3x3 stride-2 convs:
18 / 13 / 11 ms at batch 64 on two threads, against 9 / 6 / 5 ms through XLA's own convolution).
:data:`CPU_OPTIONS` keeps YNNPACK for individual matmuls only
(``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``). Measured on a 2-core AVX-512 VM (docs/bench.md): the
folded forward at batch 64 on two threads went from 690 to 755 img/s (M0) and from 315 to 364
img/s (M4); at batch 16 on one thread 548 -> 584 (M0) and unchanged (M4); the first call got
faster too. The training step runs as fast as with matmuls-and-fusions
(``LIBRARY_FUSION_TYPE_DOT``), which was ~10-20% faster than the default. Every jit of cga_jax
uses these options (the trainer's steps, :func:`jit` for ``evaluate``/``predict``), and so does
the benchmark; pass :func:`compiler_options` to your own ``jax.jit`` of a cga_jax model for the
same. Other backends get none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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
