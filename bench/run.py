"""``python -m bench.run``: cga_jax vs PyTorch (timm) and ONNX Runtime, side by side.

CPU sections (``--only``): ``official`` (M0-M5, BN folded, 1 thread, batch 16, cga_jax jit vs
PyTorch traced), ``threads2`` (M0/M4, 2 threads, batch 64, vs PyTorch eager and ONNX Runtime),
``train`` (M0/M4, fwd+bwd+AdamW, 2 threads, batch 64), ``compile`` (M5 first-call times).
``input`` (training input pipelines vs timm's DataLoader, bench/input.py; only with --only).
Accelerator section, only with ``--only gpu``: the official GPU protocol (M0-M5, BN folded,
batch 2048, fp32 and bf16 vs PyTorch fp32 and AMP) and the bf16 training step (M0/M4, batch
256). Peak memory is recorded for every process. Results: ``bench/results/<name>.{md,png,json}``.
See docs/bench.md.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from bench import analyse, machine, plan, report, runner
from bench import input as input_bench
from bench.cases import Case
from bench.runner import REPO, run_case, thread_settings, worker_env

RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 repeats of 1-2 iterations, 1 warm-up (not a measurement)",
    )
    ap.add_argument(
        "--only",
        action="append",
        metavar="SEL",
        help="sections/variants, comma-separated, repeatable: 'official', "
        "'train:m0+m4', 'gpu', 'm0' (keep only M0 in the chosen sections)",
    )
    ap.add_argument("--repeats", type=int, help="timed repeats per contestant (default 7)")
    ap.add_argument("--warmup", type=int, help="untimed iterations after the first call (3)")
    ap.add_argument(
        "--rewarm",
        type=int,
        help="untimed iterations at the start of every timed repeat (1; 0 with --quick)",
    )
    ap.add_argument(
        "--iters-scale",
        type=float,
        help="multiply the iterations per repeat of CPU cases (30 official, 8 threads2, 3 train)",
    )
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=("tuned", "default"),
        help="glibc allocator of every contestant: bench.malloc's tunables (huge pages, no "
        "munmap between steps; the default) or the environment as it is",
    )
    gpu = ap.add_argument_group("accelerator section (--only gpu)")
    gpu.add_argument(
        "--gpu-platform",
        default="cuda",
        choices=("cuda", "cpu"),
        help="where the gpu section runs; 'cpu': its code path on the CPU (a check, not a "
        "measurement)",
    )
    gpu.add_argument("--gpu-batch", type=int, help="inference batch (2048; halved until it fits)")
    gpu.add_argument("--gpu-train-batch", type=int, help="training batch (256)")
    gpu.add_argument(
        "--repeat-s", type=float, help="seconds per timed repeat (1.0; 0.2 with --quick)"
    )
    gpu.add_argument(
        "--gpu-torch-compile",
        action="store_true",
        help="add a torch.compile (AMP bf16) inference contestant",
    )
    ap.add_argument(
        "--time-budget-s",
        type=float,
        help="stop after this many seconds: cases not finished by then are reported as skipped",
    )
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    ap.add_argument(
        "--name", help="file stem of the results (default 'latest', 'quick' with --quick)"
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep weights, ONNX files, logs")
    ap.add_argument(
        "--keep-logs", action="store_true", help="copy the workers' logs to OUT/NAME_logs/"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap.parse_args(argv)  # fmt: skip


def _prepare(cases: list[Case], tmp: pathlib.Path) -> dict[str, dict[str, str]]:
    """Shared weights (and ONNX exports) of every variant, made by throw-away torch processes:
    one per distinct set of ONNX batches (usually one in all)."""
    variants = list(dict.fromkeys(c.variant for c in cases))
    onnx = {v: tuple(sorted({c.batch for c in cases if c.variant == v
                             and any(x.kind == "ort" for x in c.contestants)}))
            for v in variants}  # fmt: skip
    files: dict[str, dict[str, str]] = {}
    for batches in dict.fromkeys(onnx.values()):
        group = [v for v in variants if onnx[v] == batches]
        cmd = [sys.executable, "-m", "bench.prepare", ",".join(group), str(tmp)]
        for b in batches:
            cmd += ["--onnx-batch", str(b)]
        subprocess.run(cmd, check=True, cwd=REPO, env=worker_env("torch", 2))
        for v in group:
            files[v] = {"weights": str(tmp / f"{v}.npz")}
            files[v].update({f"onnx_b{b}": str(tmp / f"{v}_b{b}.onnx") for b in batches})
    return files


def _options(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "quick": quick,
        "repeats": args.repeats if args.repeats is not None else (2 if quick else 7),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 3),
        "rewarm": args.rewarm if args.rewarm is not None else (0 if quick else 1),
        "iters_scale": args.iters_scale or (0.05 if quick else 1.0),
        "malloc": args.malloc,
        "gpu_platform": args.gpu_platform,
        "gpu_batch": args.gpu_batch,
        "gpu_train_batch": args.gpu_train_batch,
        "repeat_s": args.repeat_s or (0.2 if quick else None),
        "gpu_torch_compile": args.gpu_torch_compile,
        "time_budget_s": args.time_budget_s,
    }


def _run_cases(
    cases: list[Case], opts: dict[str, Any], tmp: pathlib.Path, t0: float, deadline: float | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every case in turn; a failed case is an error row, a case the budget cannot take a
    skipped one. -> (results, accelerator workers' hellos)."""
    results: list[dict[str, Any]] = []
    needs_pool = any(c.device != "cpu" for c in cases)
    pool = runner.Pool(opts["gpu_platform"], tmp, deadline) if needs_pool else None
    spent: dict[tuple[str, str], float] = {}  # (section, task) -> longest case so far
    try:
        if deadline is not None and time.monotonic() >= deadline:
            return [
                analyse.evaluate(c, {"case": c.name, "skipped": "time budget"}) for c in cases
            ], {}
        try:
            files = _prepare(cases, tmp)
        except Exception as exc:  # every case fails alike; the report still says why
            err = f"preparing the weights failed: {traceback.format_exc()}\n{exc}"
            return [analyse.evaluate(c, {"case": c.name, "error": err}) for c in cases], {}
        for case in cases:
            now = time.monotonic()
            print(f"[{now - t0:6.0f}s] {case.name}", flush=True)
            if deadline is not None and now + spent.get((case.section, case.task), 0) > deadline:
                res: dict[str, Any] = {"case": case.name, "skipped": "time budget"}
                print("    skipped: the time budget cannot take it", flush=True)
                results.append(analyse.evaluate(case, res))
                continue
            try:
                res = run_case(case, opts, files[case.variant], pool, deadline=deadline)
            except runner.OutOfTime:
                res = {"case": case.name, "skipped": "time budget ran out during the case"}
                print("    stopped: the time budget ran out", file=sys.stderr)
            except Exception as exc:  # keep going: one failed case must not lose the others
                res = {"case": case.name, "error": f"{traceback.format_exc()}\n{exc}"}
                print(f"    FAILED: {report.error_summary(res['error'])}", file=sys.stderr)
            key = (case.section, case.task)
            spent[key] = max(spent.get(key, 0.0), time.monotonic() - now)
            results.append(analyse.evaluate(case, res))
    finally:
        if pool is not None:
            pool.close()
    return results, (pool.hellos if pool is not None else {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner.MALLOC = args.malloc
    opts = _options(args)
    # the input-pipeline section has its own runner and report (bench/input.py)
    only = [t for item in args.only or [] for t in item.split(",") if t.strip()]
    if "input" in only:
        quick = args.quick
        name = args.name or ("input_quick" if quick else "input")
        input_bench.run(args.out, args.repeats or (2 if quick else 5), quick, name)
        only.remove("input")
        if not only:
            return 0
    cases = plan.build_plan(plan.parse_only(only or None), opts)
    print(f"{len(cases)} cases:")
    for c in cases:
        per = f"≥{c.iters} iters, ~{c.repeat_s:g} s" if c.repeat_s else f"{c.iters} iters"
        print(f"  {c.name}: {', '.join(x.label for x in c.contestants)}; {per}/repeat")
    if args.dry_run:
        return 0
    from cga_jax.xla_options import cpu_xla_flags

    t0 = time.monotonic()
    deadline = None if args.time_budget_s is None else t0 + args.time_budget_s
    desc = machine.describe()
    if any(c.device != "cpu" for c in cases) and args.gpu_platform == "cuda" and not desc["gpus"]:
        print("warning: nvidia-smi lists no GPU; the gpu section will fail", file=sys.stderr)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="cga_bench_"))
    opts["tmp"] = str(tmp)
    name = args.name or ("quick" if args.quick else "latest")
    try:
        results, hellos = _run_cases(cases, opts, tmp, t0, deadline)
    finally:
        if args.keep_logs:
            logs = args.out / f"{name}_logs"
            logs.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):
                shutil.copy(f, logs / f.name)
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    desc["load_average_end"] = machine.load_average()
    cpu_cases = [c for c in cases if c.device == "cpu"]
    kinds = {(x.kind, c.threads, x.devices(c.threads)) for c in cpu_cases for x in c.contestants}
    run = {
        "machine": desc,
        "options": {k: v for k, v in opts.items() if k != "tmp"},
        "readme_path": report.README_PATH,
        "jax_cpu_flags": cpu_xla_flags(),  # what cga_jax.apply_cpu_flags() adds in the workers
        "thread_settings": {
            f"{k} @ {t} thread(s)" + (f", {d} devices" if d > 1 else ""): thread_settings(k, t, d)
            for k, t, d in sorted(kinds)
        },
        "accel_settings": runner.accel_settings(args.gpu_platform),
        "accelerator": hellos,
        "total_s": time.monotonic() - t0,
        "results": results,
    }
    paths = report.write(run, args.out, name)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
