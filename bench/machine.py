"""Describe the machine and software a benchmark ran on (no heavy imports)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

from cga_jax.xla_options import cpuinfo_flags

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm", "onnx", "onnxruntime")


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
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


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
    return lines
