"""Write the results: raw JSON, a Markdown report and a PNG chart."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from bench.machine import summary_lines
from bench.plan import JAX, SECTION_TITLES, short


def error_summary(text: str) -> str:
    """The exception line of a traceback (not JAX's trailing note), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or ["?"])[-1][:160].replace("|", "/")


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _rate(c: dict[str, Any]) -> str:
    if "median_img_s" not in c:
        return "-"
    return f"{c['median_img_s']:.1f} ±{100 * c['spread']:.0f}%"


def _section_table(results: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in results if "error" not in r]
    labels = list(dict.fromkeys(c["label"] for r in ok for c in r["contestants"]))
    targets = list(dict.fromkeys(k for r in ok for k in r.get("ratios", {})))
    head = ["model"] + [f"{lbl} img/s" for lbl in labels]
    head += [f"vs {t} (≥{ok[0]['ratios'][t]['target']:g}×)" for t in targets]
    train = bool(ok) and ok[0]["task"] == "train"
    if train:
        head += ["peak RSS MiB (cga_jax / others)", "loss₀ rel. diff"]
    else:
        head += ["logits rel. diff"]
    head += ["cga_jax first call s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {short(r['variant'])} | error: {error_summary(r['error'])} |")
            continue
        cs = {c["label"]: c for c in r["contestants"]}
        row = [short(r["variant"])] + [_rate(cs[lbl]) if lbl in cs else "-" for lbl in labels]
        for t in targets:
            q = r["ratios"].get(t)
            row.append(f"{q['ratio']:.2f}× {_mark(q['met'])}" if q else "-")
        if train:
            m = r["memory"]
            others = " / ".join(f"{v:.0f}" for v in m["others_mib"].values())
            row.append(f"{m['cga_jax_mib']:.0f} / {others} {_mark(m['met'])}")
        agree = r.get("agreement", {})
        row.append(", ".join(f"{v:.1e}" for v in agree.values()) or "-")
        row.append(f"{cs[JAX]['first_call_s']:.1f}" if JAX in cs else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _compile_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | function | batch | threads | section | first call s | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
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
        "| case | contestant | peak RSS MiB | RSS after imports MiB | peak - imports MiB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for c in r.get("contestants", []):
            lines.append(
                f"| {r['case']} | {c['label']} | {c['maxrss_mib']:.0f} | "
                f"{c['rss_after_import_mib']:.0f} | "
                f"{c['maxrss_mib'] - c['rss_after_import_mib']:.0f} |"
            )
    return lines


def markdown(run: dict[str, Any]) -> str:
    m = run["machine"]
    out = [f"# cga_jax CPU benchmark ({m['time_utc']} UTC)", ""]
    if run["options"]["quick"]:
        out += ["**Quick smoke run: too few repeats to be a measurement.**", ""]
    la = m.get("load_average_start")
    if la and la[0] > 0.5:
        out += [f"**Warning: load average {la[0]:.2f} at start - the machine was not idle.**", ""]
    out += ["## Machine", "", *summary_lines(m), ""]
    o = run["options"]
    out += [
        "## Protocol",
        "",
        f"- BN folding of cga_jax: `{run['fold_impl']}`; PyTorch: timm `fuse()` via the "
        "official `replace_batchnorm`.",
        f"- every contestant in its own process; the contestants of a case are timed "
        f"alternately (A B A B ...), {o['repeats']} repeats after {o['warmup']} warm-up "
        f"iterations, each repeat after {o.get('rewarm', 0)} untimed iteration(s) of its own; "
        "img/s is the median over repeats (± half the range).",
        "- same random weights (timm layout, calibrated BN statistics) and the same input "
        "for every framework; 'rel. diff' = max|cga_jax - other| / max(1, max|other|).",
        "- cga_jax's XLA-CPU flags (`cga_jax.apply_cpu_flags()`, the README's call): "
        f"`{' '.join(run.get('jax_cpu_flags') or ()) or 'none'}`.",
        "- peak RSS = `ru_maxrss` of each contestant's process (imports included).",
        "- thread settings: " + "; ".join(f"{k}: {v}" for k, v in run["thread_settings"].items()),
        "",
    ]
    by_section: dict[str, list[dict[str, Any]]] = {}
    for r in run["results"]:
        by_section.setdefault(r["section"], []).append(r)
    for section, title in SECTION_TITLES.items():
        if section == "compile":
            continue
        if section in by_section:
            out += [f"## {title}", "", *_section_table(by_section[section]), ""]
    out += [f"## {SECTION_TITLES['compile']}", "", *_compile_table(run["results"]), ""]
    out += ["## 5. Peak memory of every process", "", *_memory_table(run["results"]), ""]
    return "\n".join(out)


def chart(run: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float, bool]] = []
    comp: list[tuple[str, float, float, bool]] = []
    for r in run["results"]:
        for label, q in r.get("ratios", {}).items():
            name = f"{r['section']} {short(r['variant'])} vs {label}"
            bars.append((name, q["ratio"], q["target"], q["met"]))
        if "compile" in r:
            c = r["compile"]
            fn = "train step" if r["task"] == "train" else "forward"
            comp.append((f"{short(r['variant'])} {fn}", c["first_call_s"], c["target_s"], c["met"]))
    ncols = 1 + bool(comp)
    fig, axes = plt.subplots(
        1, ncols, figsize=(7 * ncols, 0.4 * max(len(bars), len(comp), 4) + 1.5), squeeze=False
    )
    for ax, data, xlabel in (
        (axes[0][0], bars, "cga_jax throughput / baseline (| = target)"),
        (axes[0][-1] if comp else None, comp, "first-call time, s (| = limit)"),
    ):
        if ax is None:
            continue
        names = [d[0] for d in data][::-1]
        vals = [d[1] for d in data][::-1]
        colors = ["tab:green" if d[3] else "tab:red" for d in data][::-1]
        ax.barh(names, vals, color=colors)
        for name, v in zip(names, vals, strict=True):
            ax.annotate(f" {v:.2f}", (v, name), va="center", fontsize=8)
        ax.scatter([d[2] for d in data][::-1], names, marker="|", s=300, color="black")
        if data is bars:
            ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
    title = f"cga_jax vs PyTorch / ONNX Runtime - {run['machine']['cpu'].get('model', '?')}"
    if run["options"]["quick"]:
        title += " (QUICK SMOKE RUN)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(run: dict[str, Any], out_dir: pathlib.Path, name: str) -> dict[str, pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(run, indent=1, default=str))
    paths["md"].write_text(markdown(run))
    chart(run, paths["png"])
    return paths
