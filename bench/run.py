"""``python -m bench.run``: cga_jax vs PyTorch (timm) and ONNX Runtime on this CPU.

Sections (``--only``): ``official`` (M0-M5, BN folded, 1 thread, batch 16, cga_jax jit vs
PyTorch traced), ``threads2`` (M0/M4, 2 threads, batch 64, vs PyTorch eager and ONNX Runtime),
``train`` (M0/M4, fwd+bwd+AdamW, 2 threads, batch 64), ``compile`` (M5 first-call times),
``input`` (training input pipelines vs timm's DataLoader, bench/input.py; only with --only).
Peak memory is recorded for every process. Results: ``bench/results/<name>.{md,png,json}``.
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
        "'train:m0+m4', 'm0' (keep only M0 in the chosen sections)",
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
        help="multiply the iterations per repeat (30 official, 8 threads2, 3 train)",
    )
    ap.add_argument(
        "--fused-impl",
        default="auto",
        choices=("auto", "bench", "cga_jax"),
        help="BN folding of cga_jax: cga_jax.fuse_bn if present (auto), or this "
        "package's bench.fold",
    )
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=("tuned", "default"),
        help="glibc allocator of every contestant: cga_jax.malloc's tunables (huge pages, no "
        "munmap between steps; the default) or the environment as it is",
    )
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    ap.add_argument(
        "--name", help="file stem of the results (default 'latest', 'quick' with --quick)"
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep weights, ONNX files, logs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap.parse_args(argv)  # fmt: skip


def _prepare(variant: str, onnx_batches: set[int], tmp: pathlib.Path) -> dict[str, str]:
    """Shared weights (and ONNX exports) of one variant, made by a throw-away torch process."""
    cmd = [sys.executable, "-m", "bench.prepare", variant, str(tmp)]
    for b in sorted(onnx_batches):
        cmd += ["--onnx-batch", str(b)]
    subprocess.run(cmd, check=True, cwd=REPO, env=worker_env("torch", 2))
    files = {"weights": str(tmp / f"{variant}.npz")}
    for b in onnx_batches:
        files[f"onnx_b{b}"] = str(tmp / f"{variant}_b{b}.onnx")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner.MALLOC = args.malloc
    quick = args.quick
    opts: dict[str, Any] = {
        "quick": quick,
        "repeats": args.repeats if args.repeats is not None else (2 if quick else 7),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 3),
        "rewarm": args.rewarm if args.rewarm is not None else (0 if quick else 1),
        "iters_scale": args.iters_scale or (0.05 if quick else 1.0),
        "fused_impl": args.fused_impl,
        "malloc": args.malloc,
    }
    # the input-pipeline section has its own runner and report (bench/input.py)
    only = [t for item in args.only or [] for t in item.split(",") if t.strip()]
    if "input" in only:
        from bench import input as input_bench

        name = args.name or ("input_quick" if quick else "input")
        input_bench.run(args.out, args.repeats or (2 if quick else 5), quick, name)
        only.remove("input")
        if not only:
            return 0
    cases = plan.build_plan(plan.parse_only(only or None), opts["iters_scale"])
    print(f"{len(cases)} cases:")
    for c in cases:
        print(f"  {c.name}: {', '.join(x.label for x in c.contestants)}; {c.iters} iters/repeat")
    if args.dry_run:
        return 0
    # resolve the folding implementation now, so a bad --fused-impl fails before any work
    from bench.fold import get_folder
    from cga_jax.xla_options import cpu_xla_flags

    fold_impl, _ = get_folder(args.fused_impl)
    desc = machine.describe()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="cga_bench_"))
    opts["tmp"] = str(tmp)
    results: list[dict[str, Any]] = []
    files: dict[str, dict[str, str]] = {}
    t0 = time.perf_counter()
    try:
        for case in cases:
            print(f"[{time.perf_counter() - t0:6.0f}s] {case.name}", flush=True)
            try:
                if case.variant not in files:
                    batches = {c.batch for c in cases if c.variant == case.variant
                               and any(x.kind == "ort" for x in c.contestants)}  # fmt: skip
                    files[case.variant] = _prepare(case.variant, batches, tmp)
                res = run_case(case, opts, files[case.variant])
            except Exception as exc:  # keep going: one failed case must not lose the others
                res = {"case": case.name, "error": f"{traceback.format_exc()}\n{exc}"}
                print(f"    FAILED: {report.error_summary(res['error'])}", file=sys.stderr)
            results.append(analyse.evaluate(case, res))
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    desc["load_average_end"] = machine.load_average()
    kinds = {(x.kind, c.threads, x.devices(c.threads)) for c in cases for x in c.contestants}
    run = {
        "machine": desc,
        "options": {k: v for k, v in opts.items() if k != "tmp"},
        "fold_impl": fold_impl,
        "jax_cpu_flags": cpu_xla_flags(),  # what cga_jax.apply_cpu_flags() adds in the workers
        "thread_settings": {
            f"{k} @ {t} thread(s)" + (f", {d} devices" if d > 1 else ""): thread_settings(k, t, d)
            for k, t, d in sorted(kinds)
        },
        "total_s": time.perf_counter() - t0,
        "results": results,
    }
    paths = report.write(run, args.out, args.name or ("quick" if quick else "latest"))
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
