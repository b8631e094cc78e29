"""cga_jax.xla_options: the XLA-CPU flags that apply_cpu_flags() puts into XLA_FLAGS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cga_jax import xla_options
from cga_jax.xla_options import (
    AVX512_FLAGS,
    CPU_FLAGS,
    apply_cpu_flags,
    cpu_xla_flags,
    cpuinfo_flags,
    flag_name,
)


def test_cpuinfo_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU avx512f\n"
        "flags\t\t: fpu sse2 avx2 avx512fp16 avx512f_x\n\n"
        "processor\t: 1\nflags\t\t: fpu avx512f\n"
    )
    # only the first "flags" line counts, and only whole flag names in it
    assert "avx2" in cpuinfo_flags(str(info)) and "avx512f" not in cpuinfo_flags(str(info))
    info.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert "avx512f" in cpuinfo_flags(str(info))
    assert cpuinfo_flags(str(tmp_path / "missing")) == frozenset()  # unreadable: none


def test_flags_follow_the_cpu_and_the_installed_jaxlib():
    plain = cpu_xla_flags(frozenset({"avx2"}))
    wide = cpu_xla_flags(frozenset({"avx2", "avx512f"}))
    assert set(plain) <= set(CPU_FLAGS) and set(wide) <= set(CPU_FLAGS + AVX512_FLAGS)
    assert not set(plain) & set(AVX512_FLAGS)
    # a name this jaxlib does not contain is never added (XLA aborts on unknown flags)
    assert not xla_options._jaxlib_knows("xla_cpu_no_such_flag_for_sure")
    # jaxlib 0.10 and later name both
    if jax.__version_info__ >= (0, 10):
        assert plain == CPU_FLAGS and wide == CPU_FLAGS + AVX512_FLAGS


def test_apply_adds_keeps_the_users_values_and_is_idempotent():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = apply_cpu_flags(env)
    assert added == cpu_xla_flags()
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *added]
    assert apply_cpu_flags(env) == ()  # already there
    if CPU_FLAGS[0] in added:  # a user's own value of one of our flags wins
        mine = {"XLA_FLAGS": f"--{flag_name(CPU_FLAGS[0])}=ynn_fusion_dot"}
        apply_cpu_flags(mine)
        assert mine["XLA_FLAGS"].split()[0] == f"--{flag_name(CPU_FLAGS[0])}=ynn_fusion_dot"
        assert sum(flag_name(f) == flag_name(CPU_FLAGS[0]) for f in mine["XLA_FLAGS"].split()) == 1


def test_apply_after_jax_started_raises_unless_lenient(monkeypatch):
    if not cpu_xla_flags():
        pytest.skip("this jaxlib knows none of the flags")
    jnp.zeros(1).block_until_ready()  # backends are running now
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        apply_cpu_flags()
    assert apply_cpu_flags(strict=False) == ()
    assert os.environ["XLA_FLAGS"] == ""


_PROBE = textwrap.dedent(
    """
    import sys
    import cga_jax
    if sys.argv[1] == "apply":
        cga_jax.apply_cpu_flags()
    import jax, jax.numpy as jnp

    def stats(x):  # a BatchNorm statistic over a fused producer, and a 1x1-conv matmul
        return jnp.sum(jnp.maximum(x, 0.0) * x, axis=0), x @ x.T

    x = jnp.ones((256, 64))
    text = jax.jit(stats).lower(x).compile().as_text()
    print("YNN" if "ynn_fusion" in text else "XLA")
    """
)


def test_plain_jit_of_a_user_gets_the_flags():
    """In a fresh process, apply_cpu_flags() changes what a plain ``jax.jit`` compiles."""
    if jax.default_backend() != "cpu" or CPU_FLAGS[0] not in cpu_xla_flags():
        pytest.skip("XLA-CPU with a jaxlib that knows the YNNPACK flag")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(mode: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert run("apply") == "XLA"
    assert run("none") == "YNN"  # jaxlib's default, which the flag turns off


def test_vector_width_gives_the_same_fused_conv():
    """512-bit vectorisation must not change a fused depthwise conv + ReLU (same bits)."""
    if jax.default_backend() != "cpu" or "avx512f" not in cpuinfo_flags():
        pytest.skip("XLA-CPU on an AVX-512 host only")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 14, 14, 48)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, 48)), jnp.float32)

    def f(x, k):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=48,
        )  # fmt: skip
        return jax.nn.relu(y)

    narrow = jax.jit(f, compiler_options={"xla_cpu_prefer_vector_width": 256})
    wide = jax.jit(f, compiler_options={"xla_cpu_prefer_vector_width": 512})
    np.testing.assert_array_equal(np.asarray(wide(x, k)), np.asarray(narrow(x, k)))
