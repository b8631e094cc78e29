"""Describe the machine and software a benchmark ran on (no heavy imports)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time

from cga_jax.xla_options import cpuinfo_flags

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm", "onnx", "onnxruntime")
# reported only when installed: the accelerator runtimes
ACCEL_PACKAGES = (
    "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu",
    "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cublas-cu12", "nvidia-cublas", "triton",
)  # fmt: skip
GPU_QUERY = ("name", "memory.total", "driver_version", "pci.bus_id", "clocks.max.sm", "power.limit")


def _cpuinfo() -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"model": platform.processor() or platform.machine()}
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and "model" not in out:
            out["model"] = value
        elif key == "cpu MHz" and "mhz" not in out:
            out["mhz"] = value
        elif key == "cache size" and "cache" not in out:
            out["cache"] = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys, core))
    if cores:
        out["physical_cores"] = len(cores)
    flags = cpuinfo_flags()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    out["simd"] = " ".join(simd) or "none of avx2/avx512"
    return out


def _meminfo_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _governor() -> str | None:
    try:
        return open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read().strip()
    except OSError:
        return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES + ACCEL_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in PACKAGES:
                found[name] = "absent"
    return found


def gpus() -> list[dict[str, str]]:
    """``nvidia-smi``'s view of the NVIDIA GPUs (name, memory, driver, the driver's CUDA
    version...); empty without ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        rows = subprocess.run(
            [exe, f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    out = []
    for line in rows.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        gpu = dict(zip(GPU_QUERY, values, strict=False))
        gpu["cuda_driver_api"] = cuda.group(1) if cuda else "?"
        out.append(gpu)
    return out


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def describe() -> dict:
    """A JSON-able description: CPU, cores, memory, OS, Python, library versions, load."""
    cpu = _cpuinfo()
    return {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "mem_gib": _meminfo_gib(),
        "governor": _governor(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "gpus": gpus(),
        "load_average_start": load_average(),
    }


def summary_lines(desc: dict) -> list[str]:
    """Markdown bullet lines for the report."""
    cpu = desc["cpu"]
    v = desc["versions"]
    lines = [
        f"- CPU: {cpu.get('model', '?')} ({cpu.get('physical_cores', '?')} physical cores, "
        f"{desc['logical_cpus']} logical, allowed {desc['cpus_allowed']}; {cpu.get('simd')}; "
        f"cache {cpu.get('cache', '?')}; governor {desc.get('governor') or 'n/a'})",
        f"- memory {desc['mem_gib']} GiB; {desc['os']}; Python {desc['python']}",
        "- " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- load average at start {desc.get('load_average_start')}, "
        f"at end {desc.get('load_average_end')}",
    ]
    for i, g in enumerate(desc.get("gpus") or []):
        lines.append(
            f"- GPU {i}: {g.get('name', '?')}, {g.get('memory.total', '?')}, driver "
            f"{g.get('driver_version', '?')} (CUDA {g.get('cuda_driver_api', '?')}), max SM clock "
            f"{g.get('clocks.max.sm', '?')}, power limit {g.get('power.limit', '?')}"
        )
    return lines


def accelerator_lines(hellos: dict[str, dict]) -> list[str]:
    """Markdown lines: what each accelerator worker ran on (its ``setup()`` reply)."""
    lines = []
    for kind, hello in sorted(hellos.items()):
        info = hello.get("platform") or {}
        if kind == "cga_jax":
            lines.append(
                f"- JAX: backend `{info.get('jax_backend')}`, device `{info.get('device_kind')}` "
                f"(x{info.get('device_count')}), runtime `{info.get('platform_version', '?')}`"
            )
        elif kind == "torch":
            lines.append(
                f"- PyTorch {info.get('torch')}: device {info.get('device', 'cpu')}, CUDA "
                f"{info.get('cuda', '-')}, cuDNN {info.get('cudnn', '-')}"
            )
    return lines
