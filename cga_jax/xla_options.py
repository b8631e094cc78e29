"""XLA-CPU flags for cga_jax models, applied process-wide through ``XLA_FLAGS``.

On XLA-CPU, jaxlib hands matmuls, reductions and convolutions to YNNPACK. For EfficientViT's
shapes XLA's own kernels are faster (docs/bench.md), so :func:`apply_cpu_flags` turns YNNPACK
fusions off and, on AVX-512 hosts, lets LLVM vectorise XLA's fused loops with 512-bit registers.
Because the flags go into ``XLA_FLAGS``, every ``jax.jit`` of the process gets them - the user's
own ``nnx.jit(lambda m, x: m(x))`` as much as cga_jax's entry points - and GPU/TPU compilers ignore
them. XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend, so call
:func:`apply_cpu_flags` before the first JAX computation::

    import cga_jax
    cga_jax.apply_cpu_flags()   # before anything runs on a JAX device

XLA aborts the process on a flag it does not know, so a flag is only added when the installed
jaxlib's binaries name it (flags are experimental and come and go between releases).
"""

from __future__ import annotations

import functools
import mmap
import os
import pathlib
from collections.abc import MutableMapping

import jaxlib
from jax._src import xla_bridge  # no public API tells whether XLA_FLAGS was already read

# no YNNPACK fusions: XLA's own dot, reduce and convolution
CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
# added on hosts whose CPU has AVX-512 (`avx512f`): 512-bit vectors in fused loops (same bits)
AVX512_FLAGS: tuple[str, ...] = ("--xla_cpu_prefer_vector_width=512",)


def cpuinfo_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
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


def flag_name(flag: str) -> str:
    """``'--xla_cpu_prefer_vector_width=512'`` -> ``'xla_cpu_prefer_vector_width'``."""
    return flag.lstrip("-").split("=", 1)[0]


@functools.cache
def _jaxlib_knows(name: str) -> bool:
    """Whether a binary of the installed jaxlib contains the flag name (XLA registers every flag
    by its name string)."""
    needle = name.encode()
    libs = [
        p
        for p in pathlib.Path(jaxlib.__file__).parent.iterdir()
        if p.suffix in (".so", ".dylib", ".pyd", ".dll") and p.is_file()
    ]
    for lib in sorted(libs, key=lambda p: -p.stat().st_size):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(needle) >= 0:
                return True
    return False


def cpu_xla_flags(cpu_features: frozenset[str] | None = None) -> tuple[str, ...]:
    """The flags :func:`apply_cpu_flags` adds on this host: :data:`CPU_FLAGS`, plus
    :data:`AVX512_FLAGS` when the CPU has ``avx512f``, minus any flag this jaxlib does not know."""
    features = cpuinfo_flags() if cpu_features is None else cpu_features
    flags = CPU_FLAGS + (AVX512_FLAGS if "avx512f" in features else ())
    return tuple(f for f in flags if _jaxlib_knows(flag_name(f)))


def _backends_started() -> bool:
    return xla_bridge.backends_are_initialized()


def apply_cpu_flags(
    env: MutableMapping[str, str] | None = None, *, strict: bool = True
) -> tuple[str, ...]:
    """Add :func:`cpu_xla_flags` to ``XLA_FLAGS`` in ``env`` (default ``os.environ``).

    A flag whose name is already in ``XLA_FLAGS`` is left as the user set it. Returns the flags
    added. When JAX's backends are already running and a flag is missing, XLA would never read
    it: that raises ``RuntimeError`` (``strict=False``: adds nothing and returns ``()``, for entry
    points that may run inside a process that has already used JAX).
    """
    env = os.environ if env is None else env
    have = env.get("XLA_FLAGS", "").split()
    names = {flag_name(f) for f in have}
    missing = tuple(f for f in cpu_xla_flags() if flag_name(f) not in names)
    if missing and env is os.environ and _backends_started():
        if not strict:
            return ()
        raise RuntimeError(
            "cga_jax.apply_cpu_flags() was called after JAX started its backends, so XLA would "
            f"ignore {' '.join(missing)}; call it before the first JAX computation (or export "
            f"XLA_FLAGS='{' '.join(missing)}' before starting Python)"
        )
    if missing:
        env["XLA_FLAGS"] = " ".join(have + list(missing))
    return missing
