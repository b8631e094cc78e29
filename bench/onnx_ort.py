"""``python -m bench.onnx_ort``: ONNX Runtime deployment benchmark, one process, side by side.

Contestants (same weights, same input, BN folded everywhere):

* ``cga_jax jit``: the folded cga_jax model under ``jax.jit`` (``apply_cpu_flags`` first);
* ``cga_jax->ORT fp32``: ``cga_jax.export_onnx`` (dynamic batch, NHWC) in ONNX Runtime;
* ``cga_jax->ORT int8``: that graph after ``quantize_int8`` (static QDQ, calibrated on
  generated images);
* ``timm->ORT``: ``torch.onnx.export`` of the folded timm model (fixed batch, NCHW, opset 17);
* ``torch eager`` / ``torch traced``: the folded timm model, ``torch.jit.trace`` for traced.

Weights: cga_jax's random initialisation made well conditioned (``bench.synthetic.condition_``),
exported to timm with ``cga_jax.torch_export``. Throughput: median over ``--repeats`` rounds
(contestants interleaved in every round) of the mean time per call. Batch-1 latency: median
and p99 of ``--latency-calls`` single timed calls. int8 agreement: top-1 agreement and max
logit difference vs the fp32 graph on generated images not used for calibration.

ONNX Runtime and PyTorch run with ``--threads`` intra-op threads (PyTorch with denormals
flushed to zero, as the other two); XLA-CPU uses every core the
process may run on (the report lists them). Results: ``bench/results/onnx_ort_<variant>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cga_jax
from bench import machine
from bench.common import inputs_nhwc
from bench.runner import REPO
from bench.synthetic import condition_, write_images
from bench.tasks_torch import fused_eval
from cga_jax.onnx_quantize import load_image, quantize_int8
from cga_jax.torch_export import export_torch

RESULTS = REPO / "bench" / "results"
TIMM_OPSET = 17


def _ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _images(folder: pathlib.Path, n: int, seed: int) -> np.ndarray:
    """``n`` generated images, evaluation-preprocessed: (n, 224, 224, 3) float32."""
    paths = write_images(folder, n, seed=seed, sizes=(200, 320))
    return np.stack([load_image(p, (224, 224)) for p in paths])


def build_models(variant: str, tmp: pathlib.Path, calib: int, threads: int) -> dict[str, Any]:
    """The conditioned cga_jax model, its ONNX graphs (fp32, int8) and the timm model."""
    import timm
    import torch

    torch.set_num_threads(threads)
    # XLA-CPU and ONNX Runtime flush denormals to zero; PyTorch does not by default
    torch.set_flush_denormal(True)
    calib_x = _images(tmp / "calib", calib, seed=1)
    model = cga_jax.create_model(variant)
    condition_(model, calib_x)
    folded = cga_jax.fuse_bn(model)
    graphdef, state = nnx.split(folded)
    jit_fwd = jax_forward(graphdef)

    fp32 = cga_jax.export_onnx(model, tmp / "cga_fp32.onnx")
    quantize_int8(fp32, tmp / "calib", tmp / "cga_int8.onnx", max_images=calib)

    tm = timm.create_model(variant, pretrained=False)
    sd = export_torch(model, "timm")
    # timm keeps attention_bias_idxs as a non-persistent buffer: everything else must match
    tm.load_state_dict({k: v for k, v in sd.items() if not k.endswith("attention_bias_idxs")})
    tm = fused_eval(tm)
    return {"state": state, "jit": jit_fwd, "timm": tm, "tmp": tmp}


def jax_forward(graphdef) -> Callable:
    return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))


def contestants(m: dict[str, Any], batch: int, threads: int) -> dict[str, Callable[[], Any]]:
    """name -> a zero-argument call that runs one batch and returns the logits (numpy)."""
    import torch

    x = inputs_nhwc(batch)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    xt = torch.from_numpy(x_nchw)
    timm_path = str(m["tmp"] / f"timm_b{batch}.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m["timm"], (xt,), timm_path, opset_version=TIMM_OPSET,
                          input_names=["x"], output_names=["logits"], dynamo=False)  # fmt: skip
        traced = torch.jit.freeze(torch.jit.trace(m["timm"], (xt,)))
    sessions = {k: _ort_session(str(m["tmp"] / f"cga_{k}.onnx"), threads) for k in ("fp32", "int8")}
    timm_sess = _ort_session(timm_path, threads)
    xj = jnp.asarray(x)
    state, fwd = m["state"], m["jit"]

    def torch_call(net):
        def call():
            with torch.no_grad():
                return net(xt).numpy()

        return call

    return {
        "cga_jax jit": lambda: np.asarray(fwd(state, xj).block_until_ready()),
        "cga_jax->ORT fp32": lambda: sessions["fp32"].run(None, {"input": x})[0],
        "cga_jax->ORT int8": lambda: sessions["int8"].run(None, {"input": x})[0],
        "timm->ORT": lambda: timm_sess.run(None, {"x": x_nchw})[0],
        "torch eager": torch_call(m["timm"]),
        "torch traced": torch_call(traced),
    }


def throughput(calls: dict[str, Callable], repeats: int, seconds: float) -> dict[str, dict]:
    """Median over ``repeats`` interleaved rounds of the mean ms per call."""
    iters = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        call()
        iters[name] = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(repeats):
        names = list(calls)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in names:
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                calls[name]()
            times[name].append((time.perf_counter() - t0) / iters[name] * 1e3)
    return {n: {"median_ms": float(np.median(t)), "ms": t, "iters": iters[n]}
            for n, t in times.items()}  # fmt: skip


def latency(calls: dict[str, Callable], n: int) -> dict[str, dict]:
    """Median and p99 of ``n`` single calls (batch 1), 10 calls of warm-up."""
    out = {}
    for name, call in calls.items():
        for _ in range(10):
            call()
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            t.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99))}
    return out


def int8_agreement(tmp: pathlib.Path, n: int, threads: int) -> dict[str, float]:
    x = _images(tmp / "eval", n, seed=2)
    ref = _ort_session(str(tmp / "cga_fp32.onnx"), threads).run(None, {"input": x})[0]
    got = _ort_session(str(tmp / "cga_int8.onnx"), threads).run(None, {"input": x})[0]
    return {
        "images": n,
        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
        "max_abs_fp32_logit": float(np.abs(ref).max()),
        "distinct_fp32_top1": len(set(ref.argmax(1).tolist())),
    }


def parity(calls: dict[str, Callable]) -> dict[str, float]:
    """max |logits - cga_jax jit| of every contestant (a check that they compute one thing)."""
    ref = calls["cga_jax jit"]()
    return {n: float(np.abs(c() - ref).max()) for n, c in calls.items() if n != "cga_jax jit"}


def markdown(res: dict) -> str:
    lines = [f"# ONNX Runtime deployment benchmark: {res['variant']}", ""]
    lines += machine.summary_lines(res["machine"])
    lines += [f"- threads: ORT/PyTorch intra-op {res['threads']}; XLA-CPU: the process's "
              f"{len(res['machine']['cpus_allowed'])} allowed cores",
              f"- repeats {res['repeats']}, batch-1 latency over {res['latency_calls']} calls", ""]  # fmt: skip
    for b, rows in res["throughput"].items():
        base = rows["timm->ORT"]["median_ms"]
        lines += [f"## batch {b}: median ms per call", "",
                  "| contestant | ms/call | images/s | speed vs timm->ORT |", "|---|---|---|---|"]  # fmt: skip
        for n, r in rows.items():
            ms = r["median_ms"]
            lines.append(f"| {n} | {ms:.2f} | {int(b) * 1e3 / ms:.0f} | {base / ms:.2f}x |")
        lines.append("")
    lines += ["## batch-1 latency", "", "| contestant | median ms | p99 ms |", "|---|---|---|"]
    for n, r in res["latency"].items():
        lines.append(f"| {n} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |")
    a = res["int8"]
    lines += ["", "## int8 vs fp32 (cga_jax->ORT)", "",
              f"- top-1 agreement {a['top1_agreement']:.3f} on {a['images']} generated images "
              f"({a['distinct_fp32_top1']} distinct fp32 predictions); max |logit diff| "
              f"{a['max_abs_logit_diff']:.3g} (max |fp32 logit| {a['max_abs_fp32_logit']:.3g})",
              "", "## parity at batch 1 (max |logits - cga_jax jit|)", ""]  # fmt: skip
    lines += [f"- {n}: {d:.3g}" for n, d in res["parity"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.onnx_ort", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--variant", default="efficientvit_m0")
    ap.add_argument("--batches", default="1,16", help="comma-separated (1,16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--round-seconds", type=float, default=0.5, help="time per contestant/round")
    ap.add_argument("--latency-calls", type=int, default=200)
    ap.add_argument("--calib", type=int, default=64, help="calibration images (int8)")
    ap.add_argument("--eval-images", type=int, default=200, help="int8 agreement images")
    ap.add_argument("--name", help="results file stem (default onnx_ort_<variant>_t<threads>)")
    args = ap.parse_args(argv)

    cga_jax.apply_cpu_flags()  # before the first JAX computation
    desc = machine.describe()
    batches = [int(b) for b in args.batches.split(",")]
    res: dict[str, Any] = {"variant": args.variant, "threads": args.threads,
                           "repeats": args.repeats, "latency_calls": args.latency_calls,
                           "machine": desc, "throughput": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as d:
        tmp = pathlib.Path(d)
        m = build_models(args.variant, tmp, args.calib, args.threads)
        res["int8"] = int8_agreement(tmp, args.eval_images, args.threads)
        for b in batches:
            calls = contestants(m, b, args.threads)
            if b == 1:
                res["parity"] = parity(calls)
                res["latency"] = latency(calls, args.latency_calls)
            res["throughput"][str(b)] = throughput(calls, args.repeats, args.round_seconds)
            print(f"batch {b}: " + ", ".join(f"{n} {r['median_ms']:.2f} ms"
                                             for n, r in res["throughput"][str(b)].items()))  # fmt: skip
        if "latency" not in res:
            calls = contestants(m, 1, args.threads)
            res["parity"] = parity(calls)
            res["latency"] = latency(calls, args.latency_calls)
    desc["load_average_end"] = machine.load_average()
    RESULTS.mkdir(parents=True, exist_ok=True)
    short = args.variant.removeprefix("efficientvit_")
    stem = RESULTS / (args.name or f"onnx_ort_{short}_t{args.threads}")
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
