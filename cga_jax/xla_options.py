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

On hosts with AVX-512 (``avx512f`` in ``/proc/cpuinfo``) the options add
:data:`AVX512_OPTIONS`: LLVM may then vectorise XLA's fused loops with 512-bit registers (XLA's
default prefers 256). The folded forward gave the same bits and ran faster on the AVX-512 VM
(batch 16, one thread, in-process A/B): M0 33.7 -> 32.5 ms, M2 62.3 -> 60.5, M4 85.5 -> 81.6,
M5 128.1 -> 127.5; batch 64 on two host devices M0 70.4 -> 68.2 ms, M4 192.1 -> 185.3. The M0
training step was unchanged (765 vs 754 ms). Hosts without AVX-512 keep XLA's default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions
AVX512_OPTIONS: dict[str, Any] = {"xla_cpu_prefer_vector_width": 512}  # added on AVX-512 hosts


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The host CPU's feature flags (e.g. ``avx512f``): the first ``flags`` line of ``cpuinfo``;
    empty if unreadable (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _host_has_avx512() -> bool:
    return "avx512f" in cpu_flags()


def host_cpu_options() -> dict[str, Any]:
    """A new dict: :data:`CPU_OPTIONS`, plus :data:`AVX512_OPTIONS` when the host has AVX-512."""
    return {**CPU_OPTIONS, **(AVX512_OPTIONS if _host_has_avx512() else {})}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib knows the options (older ones reject unknown names at compile)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(host_cpu_options())
    except Exception:  # noqa: BLE001 - any rejection means: don't pass them
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """Options for ``jax.jit(..., compiler_options=...)``: :func:`host_cpu_options` on CPU, else
    None.

    ``backend`` defaults to ``jax.default_backend()`` (which initialises JAX's backends: call it
    after ``jax.distributed.initialize``).
    """
    if (backend or jax.default_backend()) != "cpu" or not _cpu_options_supported():
        return None
    return host_cpu_options()


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
