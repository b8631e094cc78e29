"""One benchmark contestant in its own process: ``python -m bench.worker SPEC_JSON``.

The process pins itself to ``spec['cpus']`` before importing any framework (so thread pools
see only those cores; the parent also sets the thread environment variables), builds the task,
times its first call (trace + compile + run for cga_jax), warms up, and then obeys the parent,
one JSON line per command on stdin/stdout:

* ``run``  -> ``{"seconds": s}`` for ``spec['iters']`` iterations;
* ``stop`` -> final statistics, including the peak RSS of this process, then exits.

Library chatter goes to stderr: the protocol owns the original stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

from bench.common import maxrss_mib, rss_mib

MODULES = {"cga_jax": "bench.tasks_jax", "torch": "bench.tasks_torch", "ort": "bench.tasks_ort"}


def _describe_output(out: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    arr = np.asarray(out.detach().numpy() if hasattr(out, "detach") else out, np.float32)
    if spec["task"] == "train":
        return {"loss0": float(arr)}
    path = os.path.join(spec["out_dir"], f"{spec['name']}_logits.npy")
    np.save(path, arr)
    return {"logits": path, "logits_shape": list(arr.shape)}


def _serve(spec: dict[str, Any], proto) -> None:
    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    module = importlib.import_module(MODULES[spec["kind"]])
    ready: dict[str, Any] = {
        "import_s": time.perf_counter() - t0,
        "rss_after_import_mib": rss_mib(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    t0 = time.perf_counter()
    task = module.build(spec)
    ready["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = task.step()
    ready["first_call_s"] = time.perf_counter() - t0
    ready.update(_describe_output(out, spec))
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        task.step()
    ready["warmup_s"] = time.perf_counter() - t0
    ready["info"] = task.info
    ready["images_per_step"] = task.images_per_step
    send(ready)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            for _ in range(spec.get("rewarm", 0)):
                task.step()  # untimed: back to steady state after the other contestants' turn
            t0 = time.perf_counter()
            for _ in range(spec["iters"]):
                task.step()
            send({"seconds": time.perf_counter() - t0})
        elif cmd == "stop":
            send({"maxrss_mib": maxrss_mib(), "rss_mib": rss_mib()})
            return
        else:
            send({"error": f"unknown command {cmd!r}"})


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _serve(spec, proto)
    except Exception:
        proto.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        proto.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
