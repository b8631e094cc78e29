"""cga_jax.xla_options (compiler options of cga_jax's jits) and cga_jax.malloc (glibc tunables)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cga_jax import xla_options
from cga_jax.malloc import MALLOC_TUNABLES, is_tuned, tuned_env
from cga_jax.xla_options import AVX512_OPTIONS, CPU_OPTIONS, compiler_options, cpu_flags


def test_compiler_options_by_backend():
    assert compiler_options("gpu") is None
    assert compiler_options("tpu") is None
    opts = compiler_options("cpu")
    assert opts is not None and opts is not compiler_options("cpu")  # a copy: callers may edit it
    assert opts.items() >= CPU_OPTIONS.items()
    assert (opts.items() >= AVX512_OPTIONS.items()) == ("avx512f" in cpu_flags())
    assert set(opts) <= set(CPU_OPTIONS) | set(AVX512_OPTIONS)


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU avx512f\n"
        "flags\t\t: fpu sse2 avx2 avx512fp16 avx512f_x\n\n"
        "processor\t: 1\nflags\t\t: fpu avx512f\n"
    )
    # only the first "flags" line counts, and only whole flag names in it
    assert "avx2" in cpu_flags(str(info)) and "avx512f" not in cpu_flags(str(info))
    info.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert "avx512f" in cpu_flags(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()  # unreadable: none


def test_avx512_vector_width_gives_the_same_depthwise_conv():
    """512-bit vectorisation must not change a fused shifted-add depthwise conv + ReLU."""
    from cga_jax.ops import depthwise_conv

    if jax.default_backend() != "cpu" or compiler_options() is None:
        pytest.skip("XLA-CPU compiler options only")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 14, 14, 48)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 48)), jnp.float32)

    def f(x, k):
        return jax.nn.relu(depthwise_conv(x, k, 1, 1))

    narrow = jax.jit(f, compiler_options={**CPU_OPTIONS, "xla_cpu_prefer_vector_width": 256})
    wide = jax.jit(f, compiler_options={**CPU_OPTIONS, **AVX512_OPTIONS})
    np.testing.assert_allclose(
        np.asarray(wide(x, k)), np.asarray(narrow(x, k)), rtol=1e-6, atol=1e-6
    )


def test_cpu_options_keep_reductions_out_of_ynnpack_and_results_equal():
    def f(x):  # a BatchNorm-like statistic: a reduction over a fused producer
        return jnp.sum(jnp.maximum(x, 0.0) * x, axis=(0, 1, 2))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 14, 14, 64)), jnp.float32)
    plain = jax.jit(f)
    tuned = jax.jit(f, compiler_options=compiler_options())
    if jax.default_backend() == "cpu" and compiler_options() is not None:
        assert "__ynn_fusion" not in tuned.lower(x).compile().as_text()
    x64 = np.asarray(x, np.float64)
    ref = np.sum(np.maximum(x64, 0.0) * x64, axis=(0, 1, 2))  # float64: both orders are ~1e-6
    for fn in (plain, tuned):
        np.testing.assert_allclose(np.asarray(fn(x)), ref, rtol=1e-5)


def test_tuned_env_adds_and_keeps():
    env = tuned_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == ":".join(MALLOC_TUNABLES)
    assert is_tuned(env) and not is_tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    # a user's own values win and unrelated tunables stay
    mine = "glibc.malloc.hugetlb=0:glibc.pthread.rseq=0"
    env = tuned_env({"GLIBC_TUNABLES": mine})
    parts = env["GLIBC_TUNABLES"].split(":")
    assert parts[:2] == mine.split(":")
    assert "glibc.malloc.hugetlb=1" not in parts
    assert sum(p.startswith("glibc.malloc.mmap_threshold=") for p in parts) == 1
    assert tuned_env(env) == env  # idempotent


def test_makefile_and_docs_use_the_same_tunables():
    import pathlib

    import cga_jax.malloc

    root = pathlib.Path(__file__).resolve().parents[1]
    want = "GLIBC_TUNABLES=" + ":".join(MALLOC_TUNABLES)
    assert want in (root / "Makefile").read_text()
    assert want in (root / "README.md").read_text()
    assert want in cga_jax.malloc.__doc__


def test_cpu_options_keep_convolutions_out_of_ynnpack_and_results_equal():
    """A stem-like 3x3 stride-2 convolution goes to XLA's own (multi-threaded) convolution."""

    def f(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 56, 56, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
    tuned = jax.jit(f, compiler_options=compiler_options())
    if jax.default_backend() == "cpu" and compiler_options() is not None:
        # the program is this one convolution: nothing of it may be a YNNPACK fusion (jaxlib
        # 0.10's default makes it one, single-threaded)
        text = tuned.lower(x, k).compile().as_text()
        assert "ynn_fusion" not in text and "convolution(" in text
    np.testing.assert_allclose(
        np.asarray(tuned(x, k)), np.asarray(jax.jit(f)(x, k)), rtol=1e-4, atol=1e-4
    )


def test_cpu_options_keep_matmuls_out_of_ynnpack_and_results_equal():
    """A 1x1-conv-like matmul + bias + ReLU is XLA's own dot (faster here than YNNPACK's)."""

    def f(x, w, b):
        return jax.nn.relu(x @ w + b)

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(784, 240)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(240, 480)) / 16, jnp.float32)
    b = jnp.asarray(rng.normal(size=(480,)), jnp.float32)
    tuned = jax.jit(f, compiler_options=compiler_options())
    if jax.default_backend() == "cpu" and compiler_options() is not None:
        text = tuned.lower(x, w, b).compile().as_text()
        assert "ynn_fusion" not in text and " dot(" in text
    ref = np.maximum(np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b), 0.0)
    np.testing.assert_allclose(np.asarray(tuned(x, w, b)), ref, rtol=1e-4, atol=1e-4)


def test_lazy_jit_carries_the_options_and_static_args():
    """``xla_options.jit`` (evaluate/predict) compiles with the same options as the trainer."""

    @xla_options.jit(static_argnames=("stride",))
    def f(x, k, stride):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 56, 56, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
    assert f(x, k, stride=2).shape == (8, 28, 28, 32)
    assert f(x, k, stride=1).shape == (8, 56, 56, 32)
    if jax.default_backend() == "cpu" and compiler_options() is not None:
        text = f.jitted().lower(x, k, stride=2).compile().as_text()
        assert "ynn_fusion" not in text and "convolution(" in text
