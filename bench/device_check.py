"""One check of a bare accelerator machine: ``bash bench/device_check.sh`` runs this.

Steps, each under the wall-clock budget (default 450 s, so that the whole check with the
wheels' installation fits in 8 minutes):

1. the environment: ``nvidia-smi``, Python and package versions, JAX's devices, PyTorch's CUDA;
2. the parity tests (tests/test_parity_timm.py, tests/test_official_fixtures.py) on the device
   with full-precision matmuls (``JAX_DEFAULT_MATMUL_PRECISION=highest``,
   ``NVIDIA_TF32_OVERRIDE=0``); the official fixtures are read from ``CGA_JAX_FIXTURES`` and
   skipped cleanly without it;
3. the benchmark's accelerator section (``python -m bench.run --only gpu``) at reduced repeats,
   with the rest of the budget (cases the budget cannot take are reported as skipped).

Everything (logs, ``device_check.{md,json,png}``, ``summary.json``) goes to ``$OUT`` if set,
else ``bench/results/``. ``--cpu``: the same steps on the CPU at tiny sizes (M0, batch 4/8, one
repeat; one parity test) - a CI check of this code, not a measurement. ``--dry-run``: print the
plan, check the imports and the carried wheels, run nothing.

Only the standard library is imported at module level: ``--select-wheels`` runs before the
carried wheels are installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
WHEELS_LIST = REPO / "bench" / "device_wheels.txt"
PARITY_TESTS = ("tests/test_parity_timm.py", "tests/test_official_fixtures.py")
# module -> distribution: what the check imports (the device machine may lack some: they are
# carried as wheels, see bench/device_wheels.txt)
REQUIRED = {
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "orbax.checkpoint": "orbax-checkpoint",
    "numpy": "numpy",
    "ml_collections": "ml-collections",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "tqdm": "tqdm",
    "torch": "torch",
    "timm": "timm",
    "pytest": "pytest",
    "matplotlib": "matplotlib",
}
OPTIONAL = {"xdist": "pytest-xdist"}  # parity tests in parallel when present
RESERVE_S = 25.0  # kept back from the benchmark: its report, this script's summary


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(path: str | pathlib.Path) -> str:
    """The distribution a wheel file installs (``pytest_xdist-3.8.0-py3-none-any.whl`` ->
    ``pytest-xdist``)."""
    return _canon(pathlib.Path(path).name.split("-", 1)[0])


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def select_wheels(folder: pathlib.Path) -> list[pathlib.Path]:
    """The wheels in ``folder`` whose distribution is not installed (installing one that is
    would shadow the machine's own build of it)."""
    return [w for w in sorted(folder.glob("*.whl")) if not installed(wheel_distribution(w))]


def listed_wheels() -> list[str]:
    """The requirement lines of bench/device_wheels.txt (``name==version``)."""
    lines = WHEELS_LIST.read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Budgets and commands of the run (seconds from the start)."""
    budget = args.budget_s
    env_s = min(40.0 if not args.cpu else 90.0, budget / 5)
    parity_s = min(args.parity_s, budget / 3)
    bench_s = budget - env_s - parity_s - RESERVE_S
    if args.cpu:
        pytest_sel = ["-k", "test_param_count and efficientvit_m0"]
        bench = ["--only", "gpu:m0", "--gpu-platform", "cpu", "--gpu-batch", "4",
                 "--gpu-train-batch", "8", "--repeats", "1", "--warmup", "1",
                 "--repeat-s", "0.05"]  # fmt: skip
    else:
        pytest_sel = []
        bench = ["--only", "gpu", "--repeats", str(args.repeats), "--warmup", "2",
                 "--repeat-s", str(args.repeat_s)]  # fmt: skip
    return {
        "budget_s": budget,
        "env_s": env_s,
        "parity_s": parity_s,
        "bench_s": bench_s,
        "pytest": [*PARITY_TESTS, *pytest_sel],
        "bench": bench,
        "platform": "cpu" if args.cpu else "cuda",
    }


def check_imports() -> dict[str, str]:
    """module -> version, or 'MISSING' (required) / 'absent' (optional)."""
    out = {}
    for group, fallback in ((REQUIRED, "MISSING"), (OPTIONAL, "absent")):
        for module, dist in group.items():
            found = importlib.util.find_spec(module.split(".")[0]) is not None
            if found and "." in module:
                found = importlib.util.find_spec(module) is not None
            try:
                version = importlib.metadata.version(dist) if found else fallback
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            out[module] = version
    return out


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str], env: dict[str, str], timeout: float, log: pathlib.Path) -> dict:
    """Run ``cmd`` with its output going to ``log`` (and ours); never longer than ``timeout``."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            timed_out = True
    text = log.read_text(errors="replace")
    return {
        "rc": rc,
        "timed_out": timed_out,
        "seconds": time.monotonic() - t0,
        "tail": text[-3000:],
    }


def _device_env(platform: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["JAX_PLATFORMS"] = platform
    return env


_ENV_PROBE = """
import json, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import jax
    out["jax"] = jax.__version__
    out["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    out["jax_platform_version"] = " ".join(str(jax.devices()[0].client.platform_version).split())
except Exception as e:
    out["jax_error"] = repr(e)[:500]
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["torch_cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["torch_device"] = torch.cuda.get_device_name(0)
        out["cudnn"] = torch.backends.cudnn.version()
except Exception as e:
    out["torch_error"] = repr(e)[:500]
print(json.dumps(out))
"""


def environment(p: dict[str, Any], out: pathlib.Path, timeout: float) -> dict[str, Any]:
    """``nvidia-smi``, versions, and what JAX and PyTorch see (in a child process, so this one
    never holds device memory)."""
    lines = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            lines.append(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"nvidia-smi failed: {e}")
    else:
        lines.append("nvidia-smi: not found")
    res = _run([sys.executable, "-c", _ENV_PROBE], _device_env(p["platform"]), timeout,
               out / "env_probe.log")  # fmt: skip
    probe: dict[str, Any] = {}
    for line in reversed(res["tail"].splitlines()):
        if line.startswith("{"):
            probe = json.loads(line)
            break
    versions = check_imports()
    lines.append(json.dumps({"probe": probe, "packages": versions}, indent=1))
    (out / "env.txt").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return {"probe": probe, "packages": versions, "probe_rc": res["rc"]}


def _pytest_counts(log: str, xml: pathlib.Path) -> dict[str, int]:
    """Outcome counts: from the JUnit XML of a finished run, else (a run the budget killed) from
    the ``-v`` progress lines."""
    if xml.exists():
        import xml.etree.ElementTree as ET

        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            return {"passed": passed, "failed": n["failures"], "error": n["errors"],
                    "skipped": n["skipped"]}  # fmt: skip
    progress = log.split("short test summary info")[0]
    counts: dict[str, int] = {}
    for m in re.finditer(r"(?:^\[gw\d+\] \[\s*\d+%\] |::\S+ )(PASSED|FAILED|ERROR|SKIPPED)\b",
                         progress, re.M):  # fmt: skip
        key = m.group(1).lower()
        counts[key] = counts.get(key, 0) + 1
    return counts


def parity(p: dict[str, Any], out: pathlib.Path, timeout: float, fixtures: str | None) -> dict:
    env = _device_env(p["platform"])
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # tests/conftest.py sets it too
    env["NVIDIA_TF32_OVERRIDE"] = "0"  # cuBLAS/cuDNN in full float32 (torch and XLA alike)
    if fixtures:
        env["CGA_JAX_FIXTURES"] = fixtures
    xml = out / "parity.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs",
           f"--junitxml={xml}", *p["pytest"]]  # fmt: skip
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4", "--dist", "load"] if p["platform"] != "cpu" else ["-n", "0"]
    res = _run(cmd, env, timeout, out / "parity.log")
    res["counts"] = _pytest_counts((out / "parity.log").read_text(errors="replace"), xml)
    bad = res["counts"].get("failed") or res["counts"].get("error")
    res["ok"] = res["rc"] in (0, 5) and not res["timed_out"] and not bad
    return res


def benchmark(p: dict[str, Any], out: pathlib.Path, name: str, budget: float) -> dict:
    budget = max(budget, 1.0)
    cmd = [sys.executable, "-m", "bench.run", *p["bench"], "--time-budget-s", f"{budget:.0f}",
           "--out", str(out), "--name", name, "--keep-logs"]  # fmt: skip
    env = _device_env(p["platform"])
    res = _run(cmd, env, budget + 20.0, out / f"{name}_bench.log")
    res["report"] = {ext: str(out / f"{name}.{ext}") for ext in ("md", "json", "png")
                     if (out / f"{name}.{ext}").exists()}  # fmt: skip
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bash bench/device_check.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan, check imports")
    mode.add_argument("--cpu", action="store_true", help="the same steps on the CPU, tiny sizes")
    mode.add_argument("--select-wheels", type=pathlib.Path, metavar="DIR",
                      help="print DIR's wheels whose distribution is not installed")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget (450)")
    ap.add_argument("--parity-s", type=float, default=140.0, help="parity tests' share (140)")
    ap.add_argument("--repeats", type=int, default=3, help="benchmark repeats (3)")
    ap.add_argument("--repeat-s", type=float, default=0.3, help="seconds per repeat (0.3)")
    ap.add_argument("--skip-parity", action="store_true", help="benchmark only")
    ap.add_argument(
        "--out", type=pathlib.Path, help="output folder (default $OUT or bench/results)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if args.select_wheels is not None:
        print(" ".join(str(w) for w in select_wheels(args.select_wheels)))
        return 0
    out = args.out or pathlib.Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "device_check_cpu" if args.cpu else "device_check"
    p = plan(args)
    fixtures = os.environ.get("CGA_JAX_FIXTURES")
    print(f"device check ({'CPU mode' if args.cpu else 'GPU'}), output in {out}")
    print(
        f"  budget {p['budget_s']:.0f} s: environment ≤{p['env_s']:.0f} s, parity ≤"
        f"{p['parity_s']:.0f} s, benchmark ≤{p['bench_s']:.0f} s (+ what the others leave)"
    )
    print(
        f"  parity: pytest {' '.join(p['pytest'])} (fixtures: {fixtures or 'not given: skipped'})"
    )
    print(f"  benchmark: python -m bench.run {' '.join(p['bench'])}")
    if args.dry_run:
        imports = check_imports()
        missing = [m for m, v in imports.items() if v == "MISSING"]
        print("  imports: " + ", ".join(f"{m} {v}" for m, v in imports.items()))
        folder = REPO / ".whl"
        have = {wheel_distribution(w): w.name for w in folder.glob("*.whl")}
        print(f"  carried wheels ({folder}, listed in {WHEELS_LIST.name}):")
        for req in listed_wheels():
            dist = _canon(req.split("==")[0])
            state = have.get(dist, "not downloaded (bench/fetch_device_wheels.sh)")
            print(f"    {req}: {state}; {'installed here' if installed(dist) else 'not installed'}")
        if missing:
            print(f"MISSING imports: {', '.join(missing)}", file=sys.stderr)
        return 1 if missing else 0
    deadline = t0 + args.budget_s
    summary: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "plan": p}
    summary["environment"] = environment(p, out, min(p["env_s"], deadline - time.monotonic()))
    if not args.skip_parity:
        left = deadline - time.monotonic() - RESERVE_S
        timeout = min(p["parity_s"], left - p["bench_s"] / 2)
        res = parity(p, out, timeout, fixtures)
        summary["parity"] = {k: v for k, v in res.items() if k != "tail"}
        print(f"parity: {res['counts']} rc {res['rc']}{' TIMED OUT' if res['timed_out'] else ''}"
              f" in {res['seconds']:.0f} s", flush=True)  # fmt: skip
    remaining = deadline - time.monotonic() - RESERVE_S
    res = benchmark(p, out, name, remaining)
    summary["benchmark"] = {k: v for k, v in res.items() if k != "tail"}
    print(res["tail"][-2000:] if res["rc"] else f"benchmark: rc 0 in {res['seconds']:.0f} s")
    summary["total_s"] = time.monotonic() - t0
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    ok = summary.get("parity", {}).get("ok", True) and res["rc"] == 0 and "md" in res["report"]
    print(
        f"device check {'passed' if ok else 'FAILED'} in {summary['total_s']:.0f} s; "
        f"report: {res['report'].get('md', 'none')}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
