"""Write the results: raw JSON, a Markdown report and a PNG chart."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

from bench import plan_gpu
from bench.cases import JAX
from bench.machine import accelerator_lines, summary_lines
from bench.plan import SECTION_TITLES, short

README_PATH = (
    "cga_jax.apply_cpu_flags(); model = cga_jax.create_model(name, pretrained=weights); "
    "model.eval(); model = cga_jax.fuse_bn(model); graphdef, state = nnx.split(model); "
    "forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)); forward(state, x)"
)


def error_summary(text: str) -> str:
    """The exception line of a traceback (not JAX's trailing note), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or ["?"])[-1][:160].replace("|", "/")


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("✓" if ok else "✗")


def _rate(c: dict[str, Any], batch: int) -> str:
    if "median_img_s" not in c:
        return "-"
    note = f" (b{c['batch']})" if c.get("batch", batch) != batch else ""
    return f"{c['median_img_s']:,.1f} ±{100 * c['spread']:.0f}%{note}"


def _not_run(r: dict[str, Any]) -> str | None:
    if "error" in r:
        return f"error: {error_summary(r['error'])}"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return None


def _section_table(results: list[dict[str, Any]], first_call: bool = True) -> list[str]:
    ok = [r for r in results if _not_run(r) is None]
    labels = list(dict.fromkeys(c["label"] for r in ok for c in r["contestants"]))
    ratio_keys = list(dict.fromkeys(k for r in ok for k in r.get("ratios", {})))
    targets = {k: q["target"] for r in ok for k, q in r.get("ratios", {}).items()}
    absolute = list(
        dict.fromkeys((a["label"], a["what"]) for r in ok for a in r.get("absolute", []))
    )
    accel = any(r.get("device", "cpu") != "cpu" for r in results)
    head = ["model"] + (["batch"] if accel else []) + [f"{lbl} img/s" for lbl in labels]
    names = {k: k if " vs " in k else f"vs {k}" for k in ratio_keys}  # "vs X": cga_jax / X
    head += [f"{names[k]} (≥{targets[k]:g}×)" if targets[k] else names[k] for k in ratio_keys]
    head += [f"{label} / ({what}) (≥1×)" for label, what in absolute]
    train = bool(results) and results[0]["task"] == "train"
    if train and any("memory" in r for r in ok):
        head += ["peak RSS MiB (cga_jax / others)"]
    head += ["loss₀ rel. diff" if train else "logits rel. diff"]
    if first_call:
        head += ["cga_jax first call s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: r["variant"]) if accel else results:
        if (why := _not_run(r)) is not None:
            lines.append(f"| {short(r['variant'])} | {why} |")
            continue
        cs = {c["label"]: c for c in r["contestants"]}
        row = [short(r["variant"])] + ([str(r["batch"])] if accel else [])
        row += [_rate(cs[lbl], r["batch"]) if lbl in cs else "-" for lbl in labels]
        for k in ratio_keys:
            q = r["ratios"].get(k)
            row.append(f"{q['ratio']:.2f}× {_mark(q['met'])}".strip() if q else "-")
        for label, what in absolute:
            a = [x for x in r.get("absolute", []) if (x["label"], x["what"]) == (label, what)]
            row.append(f"{a[0]['img_s'] / a[0]['target']:.2f}× {_mark(a[0]['met'])}" if a else "-")
        if "peak RSS MiB (cga_jax / others)" in head:
            m = r.get("memory")
            others = " / ".join(f"{v:.0f}" for v in m["others_mib"].values()) if m else ""
            row.append(f"{m['cga_jax_mib']:.0f} / {others} {_mark(m['met'])}" if m else "-")
        agree = r.get("agreement", {})
        if len(agree) > 1:
            row.append(", ".join(f"{k}: {v:.1e}" for k, v in agree.items()))
        else:
            row.append(", ".join(f"{v:.1e}" for v in agree.values()) or "-")
        if first_call:
            row.append(f"{cs[JAX]['first_call_s']:.1f}" if JAX in cs else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _first_call_table(results: list[dict[str, Any]]) -> list[str]:
    """Every contestant's build and first call (accelerator sections)."""
    lines = [
        "| model | task | contestant | batch | build s | first call s | warm step ms "
        "| logits vs own fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["task"], r["variant"])):
        for c in r.get("contestants", []):
            prec = r.get("precision", {}).get(c["label"])
            lines.append(
                f"| {short(r['variant'])} | {r['task']} | {c['label']} | {c.get('batch', '?')} | "
                f"{c['build_s']:.1f} | {c['first_call_s']:.1f} | {1e3 * c['step_s']:.1f} | "
                f"{'-' if prec is None else f'{prec:.1e}'} |"
            )
    return lines


def _compile_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | function | batch | threads | section | first call s | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if _not_run(r) is not None or r.get("device", "cpu") != "cpu":
            continue
        for c in r["contestants"]:
            if c["label"] != JAX:
                continue
            fn = "train step" if r["task"] == "train" else "forward (folded)"
            comp = r.get("compile")
            target = f"≤ {comp['target_s']:g} s {_mark(comp['met'])}" if comp else ""
            lines.append(
                f"| {short(r['variant'])} | {fn} | {r['batch']} | {r['threads']} | "
                f"{r['section']} | {c['first_call_s']:.1f} | {target} |"
            )
    return lines


def _memory_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| case | contestant | peak RSS MiB | RSS after imports MiB | peak - imports MiB "
        "| device peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for c in r.get("contestants", []):
            dev = c.get("device_peak_bytes_in_use_mib")
            lines.append(
                f"| {r['case']} | {c['label']} | {c['maxrss_mib']:.0f} | "
                f"{c['rss_after_import_mib']:.0f} | "
                f"{c['maxrss_mib'] - c['rss_after_import_mib']:.0f} | "
                f"{'-' if dev is None else f'{dev:.0f}'} |"
            )
    return lines


def _cpu_protocol(run: dict[str, Any]) -> list[str]:
    o = run["options"]
    return [
        "- CPU sections: every contestant in its own process; the contestants of a case are "
        f"timed alternately (A B A B ...), {o['repeats']} repeats after {o['warmup']} warm-up "
        f"iterations, each repeat after {o.get('rewarm', 0)} untimed iteration(s) of its own; "
        "img/s is the median over repeats (± half the range).",
        "- cga_jax's XLA-CPU flags (added by `cga_jax.apply_cpu_flags()`): "
        f"`{' '.join(run.get('jax_cpu_flags') or ()) or 'none'}`.",
        "- peak RSS = `ru_maxrss` of each contestant's process (imports included).",
        "- thread settings: " + "; ".join(f"{k}: {v}" for k, v in run["thread_settings"].items()),
    ]


def _gpu_protocol(run: dict[str, Any]) -> list[str]:
    o = run["options"]
    compiled = " (+ `torch.compile` AMP bf16, for comparison)" if o.get("gpu_torch_compile") else ""
    return [
        f"- Accelerator section: {run.get('accel_settings', '?')}.",
        "- one worker process per framework serves every case; a case's contestants are built "
        "in it one after the other, then timed alternately, "
        f"{o['repeats']} repeats of about {o.get('repeat_s') or plan_gpu.REPEAT_S:g} s each "
        "(iterations per repeat from the warm-up's step time), after at least "
        f"{o['warmup']} warm-up iterations and one repeat's time of warm-up; every step ends "
        "synchronised with the device (`block_until_ready`, `torch.cuda.synchronize()`); "
        "img/s is the median over repeats.",
        f"- inference: BN folded, 224x224, batch {o.get('gpu_batch') or plan_gpu.INFER_BATCH} "
        "halved until it fits in the device memory (the batch column; a contestant's own "
        "batch in parentheses when it differs). cga_jax fp32 = the README path; cga_jax bf16 = "
        "the same jitted function with the float32 input cast to bfloat16 inside it (float32 "
        "parameters, cast where the layers use them; attention softmax and BN statistics in "
        "float32). fp32 = float32 storage at each framework's default GPU precision (TF32 "
        "tensor cores for matmuls and convolutions on both sides).",
        "- PyTorch: timm, BN fused with the official `replace_batchnorm`, `torch.jit.trace` in "
        "float32 and run under `torch.autocast(dtype=...)` for AMP - the official "
        "`speed_test.py` (whose GPU figures are fp16 autocast) - one traced module per "
        f"contestant{compiled}. Tracing, not `torch.compile`: it is the paper's protocol, and "
        "compiling six models in three precisions does not fit a device check's minutes.",
        f"- training: one step at batch {o.get('gpu_train_batch') or plan_gpu.TRAIN_BATCH}, "
        "train-mode BN, softmax cross-entropy, AdamW (lr 1e-3, weight decay 0.05). cga_jax: "
        "`jax.jit` step, parameters/BN state/optimizer state donated, float32 parameters cast "
        "to bfloat16 inside the step (as the trainer's `compute_dtype='bfloat16'`); PyTorch: "
        "eager, forward and loss under `torch.autocast(dtype=torch.bfloat16)`, fused AdamW on "
        "CUDA.",
        "- first call = trace + compile + first run (PyTorch: the first run after "
        "`torch.jit.trace`, which is in the build time). 'logits vs own fp32': a bf16/fp16 "
        "contestant's logits against its framework's fp32 run, the rounding of reduced "
        "precision alone (cga_jax and PyTorch should be alike).",
        f"- targets: cga_jax bf16 ≥ {plan_gpu.TARGET_RATIO:g}x PyTorch AMP (folded) for M0-M5 "
        "and on the training step; M0 ≥ 3x the paper's V100 figure "
        f"({plan_gpu.PAPER_V100_M0_IMG_S:,.0f} img/s).",
    ]


def _render_gpu(results: list[dict[str, Any]], platform: str) -> list[str]:
    where = (
        ""
        if platform != "cpu"
        else " - run on the CPU (a check of the code path, NOT a GPU measurement)"
    )
    out = []
    for task, title in (("infer", "inference, throughput"), ("train", "training step, bf16")):
        rs = [r for r in results if r["task"] == task]
        if rs:
            out += [f"### {title}{where}", "", *_section_table(rs, first_call=False), ""]
    out += [f"### first calls and step times{where}", "", *_first_call_table(results), ""]
    return out


def _render_default(results: list[dict[str, Any]], platform: str) -> list[str]:
    return [*_section_table(results), ""]


RENDERERS: dict[str, Callable[[list[dict[str, Any]], str], list[str]]] = {"gpu": _render_gpu}


def markdown(run: dict[str, Any]) -> str:
    m = run["machine"]
    by_section: dict[str, list[dict[str, Any]]] = {}
    for r in run["results"]:
        by_section.setdefault(r["section"], []).append(r)
    platform = run["options"].get("gpu_platform", "cuda")
    parts = ["CPU"] if by_section.keys() - {"gpu"} else []
    if "gpu" in by_section:
        parts.append("GPU" if platform != "cpu" else "GPU section run on the CPU")
    out = [f"# cga_jax benchmark: {' + '.join(parts) or 'nothing'} ({m['time_utc']} UTC)", ""]
    if run["options"]["quick"]:
        out += ["**Quick smoke run: too few repeats to be a measurement.**", ""]
    if "gpu" in by_section and platform == "cpu":
        out += ["**The accelerator section ran on the CPU: a check of the code path, NOT a GPU "
                "measurement.**", ""]  # fmt: skip
    la = m.get("load_average_start")
    if la and la[0] > 0.5:
        out += [f"**Warning: load average {la[0]:.2f} at start - the machine was not idle.**", ""]
    out += ["## Machine", "", *summary_lines(m), *accelerator_lines(run.get("accelerator", {})), ""]
    out += [
        "## Protocol",
        "",
        f"- cga_jax runs the README's path: `{README_PATH}` (nothing else: no compiler options, "
        "no private helpers); BN folding by `cga_jax.fuse_bn`. PyTorch: timm, BN fused with the "
        "official `replace_batchnorm`.",
        "- same random weights (timm layout, calibrated BN statistics) and the same input for "
        "every framework; 'rel. diff' = max|cga_jax - other| / max(1, max|other|) (the cga_jax "
        "contestant of the same precision).",
    ]
    if by_section.keys() - {"gpu"}:
        out += _cpu_protocol(run)
    if "gpu" in by_section:
        out += _gpu_protocol(run)
    out.append("")
    for section, title in SECTION_TITLES.items():
        if section == "compile" or section not in by_section:
            continue
        render = RENDERERS.get(section, _render_default)
        out += [f"## {title}", "", *render(by_section[section], platform)]
    if by_section.keys() - {"gpu"}:
        out += [f"## {SECTION_TITLES['compile']}", "", *_compile_table(run["results"]), ""]
    out += ["## Peak memory of every process", "", *_memory_table(run["results"]), ""]
    return "\n".join(out)


def chart(run: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float | None, bool | None]] = []
    comp: list[tuple[str, float, float, bool]] = []
    for r in run["results"]:
        for key, q in r.get("ratios", {}).items():
            name = f"{r['section']} {short(r['variant'])} {r['task']} {key}"
            bars.append((name, q["ratio"], q["target"], q["met"]))
        if "compile" in r:
            c = r["compile"]
            fn = "train step" if r["task"] == "train" else "forward"
            comp.append((f"{short(r['variant'])} {fn}", c["first_call_s"], c["target_s"], c["met"]))
    ncols = 1 + bool(comp)
    fig, axes = plt.subplots(
        1, ncols, figsize=(8 * ncols, 0.4 * max(len(bars), len(comp), 4) + 1.5), squeeze=False
    )
    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    for ax, data, xlabel in (
        (axes[0][0], bars, "cga_jax throughput / baseline (| = target)"),
        (axes[0][-1] if comp else None, comp, "first-call time, s (| = limit)"),
    ):
        if ax is None:
            continue
        names = [d[0] for d in data][::-1]
        vals = [d[1] for d in data][::-1]
        ax.barh(names, vals, color=[colors[d[3]] for d in data][::-1])
        for name, v in zip(names, vals, strict=True):
            ax.annotate(f" {v:.2f}", (v, name), va="center", fontsize=8)
        marks = [(d[2], d[0]) for d in data if d[2] is not None]
        if marks:
            ax.scatter(
                [t for t, _ in marks], [n for _, n in marks], marker="|", s=300, color="black"
            )
        if data is bars:
            ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
    gpus = run["machine"].get("gpus") or []
    accel = any(r["section"] == "gpu" for r in run["results"])
    on_gpu = accel and run["options"].get("gpu_platform", "cuda") != "cpu" and gpus
    where = gpus[0].get("name", "GPU") if on_gpu else run["machine"]["cpu"].get("model", "?")
    title = f"cga_jax vs PyTorch / ONNX Runtime - {where}"
    if accel and not on_gpu:
        title += " (GPU SECTION ON CPU: NOT A MEASUREMENT)"
    if run["options"]["quick"]:
        title += " (QUICK SMOKE RUN)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(run: dict[str, Any], out_dir: pathlib.Path, name: str) -> dict[str, pathlib.Path]:
    """``name``.json, .md and (with matplotlib) .png in ``out_dir``; the files are written to
    temporary names and renamed, so a failure leaves no partial report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {"json": json.dumps(run, indent=1, default=str), "md": markdown(run)}
    paths = {}
    for ext, text in texts.items():
        paths[ext] = out_dir / f"{name}.{ext}"
        tmp = paths[ext].with_name(f".{name}.{ext}.tmp")
        tmp.write_text(text)
        tmp.replace(paths[ext])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return paths
    paths["png"] = out_dir / f"{name}.png"
    tmp = out_dir / f".{name}.tmp.png"
    chart(run, tmp)
    tmp.replace(paths["png"])
    return paths
