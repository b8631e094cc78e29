"""Turn raw case timings into ratios, agreement checks and target verdicts."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.cases import JAX, Case


def _by_label(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["label"]: c for c in res["contestants"]}


def _reference(case: Case, label: str, labels: set[str]) -> str | None:
    """Which cga_jax contestant another contestant's output is compared with: the numerator of
    a target against it, else ``JAX``."""
    for ours, base, _ in case.ratio_targets:
        if base == label and ours in labels:
            return ours
    return JAX if JAX in labels and label != JAX else None


def _agreement(case: Case, res: dict[str, Any]) -> dict[str, float]:
    """Relative max |difference| of a cga_jax contestant's first output (logits, or the step-1
    loss) from each other framework's: ``max|a - b| / max(1, max|b|)``, keyed by the other's
    label."""
    cs = _by_label(res)
    out: dict[str, float] = {}
    for label, c in cs.items():
        ref = _reference(case, label, set(cs))
        if ref is None or ref == label:
            continue
        if case.task == "train":
            a, b = np.float64(cs[ref]["loss0"]), np.float64(c["loss0"])
        else:
            a = np.load(cs[ref]["logits"]).astype(np.float64)
            b = np.load(c["logits"]).astype(np.float64)
            if a.shape != b.shape:  # batches probed down to different sizes: the common rows
                n = min(a.shape[0], b.shape[0])
                a, b = a[:n], b[:n]
        out[label] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
    return out


def _precision(case: Case, res: dict[str, Any]) -> dict[str, float]:
    """Accelerator inference: each reduced-precision contestant's first logits against the
    float32 contestant of the same framework (the rounding error of bf16/fp16 on its own),
    keyed by the reduced-precision label."""
    if case.task != "infer" or case.device == "cpu":
        return {}
    f32 = {c["kind"]: c for c in res["contestants"] if c["dtype"] == "float32"}
    out = {}
    for c in res["contestants"]:
        ref = f32.get(c["kind"])
        if c["dtype"] == "float32" or ref is None:
            continue
        a, b = np.load(c["logits"]).astype(np.float64), np.load(ref["logits"]).astype(np.float64)
        n = min(a.shape[0], b.shape[0])
        out[c["label"]] = float(
            np.max(np.abs(a[:n] - b[:n])) / max(1.0, float(np.max(np.abs(b[:n]))))
        )
    return out


def evaluate(case: Case, res: dict[str, Any]) -> dict[str, Any]:
    """Adds ``ratios`` ("ours vs baseline" -> ratio, target, met), ``absolute`` (img/s targets),
    ``agreement``, ``memory`` (CPU training) and ``compile`` (first call vs target) to ``res``."""
    res.update(section=case.section, variant=case.variant, task=case.task, batch=case.batch,
               threads=case.threads, iters=case.iters, device=case.device)  # fmt: skip
    if "error" in res or "skipped" in res:
        return res
    cs = _by_label(res)
    ratios = {}
    for ours, label, target in case.ratio_targets:
        a, base = cs.get(ours, {}), cs.get(label, {})
        if "median_img_s" in a and "median_img_s" in base:
            r = a["median_img_s"] / base["median_img_s"]
            key = label if ours == JAX else f"{ours} vs {label}"
            met = None if target is None else r >= target
            ratios[key] = {"ratio": r, "target": target, "met": met, "ours": ours, "base": label}
    res["ratios"] = ratios
    res["absolute"] = [
        {"label": label, "img_s": cs[label]["median_img_s"], "target": floor, "what": what,
         "met": cs[label]["median_img_s"] >= floor}
        for label, floor, what in case.abs_targets
        if "median_img_s" in cs.get(label, {})
    ]  # fmt: skip
    res["agreement"] = _agreement(case, res)
    res["precision"] = _precision(case, res)
    if case.task == "train" and case.device == "cpu" and JAX in cs:
        jax = cs[JAX]
        others = {k: v["maxrss_mib"] for k, v in cs.items() if k != JAX}
        res["memory"] = {
            "cga_jax_mib": jax["maxrss_mib"],
            "others_mib": others,
            "met": all(jax["maxrss_mib"] <= v for v in others.values()),
        }
    if case.compile_target_s is not None and JAX in cs:
        t = cs[JAX]["first_call_s"]
        res["compile"] = {"first_call_s": t, "target_s": case.compile_target_s,
                          "met": t <= case.compile_target_s}  # fmt: skip
    return res
