"""Turn raw case timings into ratios, agreement checks and target verdicts."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.plan import JAX, Case


def _by_label(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["label"]: c for c in res["contestants"]}


def _agreement(res: dict[str, Any], task: str) -> dict[str, float]:
    """Relative max |difference| of cga_jax's first output (logits, or the step-1 loss) from
    each other contestant's: ``max|a - b| / max(1, max|b|)``."""
    cs = _by_label(res)
    jax = cs.get(JAX)
    out: dict[str, float] = {}
    if jax is None:
        return out
    for label, c in cs.items():
        if label == JAX:
            continue
        if task == "train":
            a, b = np.float64(jax["loss0"]), np.float64(c["loss0"])
        else:
            a, b = np.load(jax["logits"]).astype(np.float64), np.load(c["logits"])
        out[label] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
    return out


def evaluate(case: Case, res: dict[str, Any]) -> dict[str, Any]:
    """Adds ``ratios`` (cga_jax / each target baseline), ``agreement``, ``memory`` (training)
    and ``compile`` (first call vs target) to ``res``."""
    res.update(section=case.section, variant=case.variant, task=case.task, batch=case.batch,
               threads=case.threads, iters=case.iters)  # fmt: skip
    if "error" in res:
        return res
    cs = _by_label(res)
    jax = cs[JAX]
    ratios = {}
    for label, target in case.targets:
        base = cs[label]
        if "median_img_s" in jax and "median_img_s" in base:
            r = jax["median_img_s"] / base["median_img_s"]
            ratios[label] = {"ratio": r, "target": target, "met": r >= target}
    res["ratios"] = ratios
    res["agreement"] = _agreement(res, case.task)
    if case.task == "train":
        others = {k: v["maxrss_mib"] for k, v in cs.items() if k != JAX}
        res["memory"] = {
            "cga_jax_mib": jax["maxrss_mib"],
            "others_mib": others,
            "met": all(jax["maxrss_mib"] <= v for v in others.values()),
        }
    if case.compile_target_s is not None:
        t = jax["first_call_s"]
        res["compile"] = {"first_call_s": t, "target_s": case.compile_target_s,
                          "met": t <= case.compile_target_s}  # fmt: skip
    return res
