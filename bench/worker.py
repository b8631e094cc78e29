"""Benchmark contestants in their own process: ``python -m bench.worker PROC_JSON``.

``PROC_JSON`` names the framework (``kind``) and, on CPU, the CPUs to pin to: the process pins
itself before importing any framework (so thread pools see only those cores; the parent also
sets the thread environment variables), imports the task module, calls its ``setup`` and says
hello (import time, RSS, platform). Then it obeys the parent, one JSON line per command on
stdin/stdout:

* ``{"cmd": "build", "id": ID, "spec": {...}}`` -> builds a task, times its first call (trace +
  compile + run for cga_jax), warms it up; with ``spec['probe_oom']`` a batch that does not fit
  in device memory is halved until one does; replies what it measured;
* ``{"cmd": "run", "id": ID, "iters": N, "rewarm": K}`` -> ``{"seconds": s}`` for N iterations
  after K untimed ones;
* ``{"cmd": "drop", "id": ID}`` -> frees the task, replies the memory statistics;
* ``{"cmd": "stop"}`` -> the final memory statistics, then exits.

A CPU case starts one process per contestant (its peak RSS is that contestant's); an accelerator
run keeps one process per framework for all its cases. Library chatter goes to stderr: the
protocol owns the original stdout.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
import traceback
from types import ModuleType
from typing import Any

from bench.common import maxrss_mib, rss_mib
from bench.worker_api import Task

MODULES = {"cga_jax": "bench.tasks_jax", "torch": "bench.tasks_torch", "ort": "bench.tasks_ort"}


def _describe_output(out: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    if hasattr(out, "detach"):  # torch: any device, any dtype
        out = out.detach().float().cpu().numpy()
    arr = np.asarray(out, np.float32)
    if spec["task"] == "train":
        return {"loss0": float(arr)}
    path = os.path.join(spec["out_dir"], f"{spec['name']}_logits.npy")
    np.save(path, arr)
    return {"logits": path, "logits_shape": list(arr.shape)}


def build_probing(module: ModuleType, spec: dict[str, Any]) -> tuple[Task, Any, dict[str, Any]]:
    """Build the task and make its first call; with ``spec['probe_oom']``, on an out-of-memory
    error (``module.is_oom``) retry at half the batch (down to 1). -> (task, first output,
    timings: build_s, first_call_s, batch, oom_batches)."""
    batch = spec["batch"]
    oom: list[int] = []
    while True:
        try:
            t0 = time.perf_counter()
            task = module.build({**spec, "batch": batch})
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = task.step()
            first_s = time.perf_counter() - t0
            return task, out, {"build_s": build_s, "first_call_s": first_s, "batch": batch,
                               "oom_batches": oom}  # fmt: skip
        except Exception as exc:
            if not (spec.get("probe_oom") and module.is_oom(exc)) or batch <= 1:
                raise
        task = out = None  # noqa: F841 - drop every reference to the failed attempt's buffers
        gc.collect()
        module.release()
        oom.append(batch)
        print(f"batch {batch} does not fit: trying {batch // 2}", file=sys.stderr)
        batch //= 2


def _build(module: ModuleType, spec: dict[str, Any]) -> tuple[Task, dict[str, Any]]:
    module.reset_peak_memory()
    task, out, ready = build_probing(module, spec)
    ready.update(_describe_output(out, spec))
    # warm-up: `warmup` iterations and, if given, at least `warmup_s` seconds
    t0 = time.perf_counter()
    n = 0
    while n < spec["warmup"] or time.perf_counter() - t0 < spec.get("warmup_s", 0.0):
        task.step()
        n += 1
    ready["warmup_s"] = time.perf_counter() - t0
    ready["warmup_iters"] = n
    ready["step_s"] = ready["warmup_s"] / n if n else ready["first_call_s"]
    ready["info"] = task.info
    ready["images_per_step"] = task.images_per_step
    return task, ready


def _memory(module: ModuleType) -> dict[str, Any]:
    return {"maxrss_mib": maxrss_mib(), "rss_mib": rss_mib(), **module.device_memory()}


def _serve(proc: dict[str, Any], proto) -> None:
    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    module = importlib.import_module(MODULES[proc["kind"]])
    hello: dict[str, Any] = {
        "import_s": time.perf_counter() - t0,
        "rss_after_import_mib": rss_mib(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    t0 = time.perf_counter()
    hello["platform"] = module.setup(proc)
    hello["setup_s"] = time.perf_counter() - t0
    send(hello)
    tasks: dict[str, Task] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "build":
                tasks[msg["id"]], ready = _build(module, msg["spec"])
                send(ready)
            elif cmd == "run":
                task = tasks[msg["id"]]
                for _ in range(msg.get("rewarm", 0)):
                    task.step()  # untimed: back to steady state after the other contestants' turn
                t0 = time.perf_counter()
                for _ in range(msg["iters"]):
                    task.step()  # every step ends synchronised with the device
                send({"seconds": time.perf_counter() - t0})
            elif cmd == "drop":
                stats = _memory(module)
                del tasks[msg["id"]]
                gc.collect()
                module.release()
                send(stats)
            elif cmd == "stop":
                send(_memory(module))
                return
            else:
                send({"error": f"unknown command {cmd!r}"})
        except Exception:
            send({"error": traceback.format_exc()})


def main() -> None:
    proc = json.loads(sys.argv[1])
    if proc.get("cpus"):
        os.sched_setaffinity(0, proc["cpus"])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _serve(proc, proto)
    except Exception:
        proto.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        proto.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
