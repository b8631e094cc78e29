"""Start contestant processes with the right thread settings and time them alternately."""

from __future__ import annotations

import json
import os
import pathlib
import select
import statistics
import subprocess
import sys
import time
from typing import IO, Any

from bench.malloc import MALLOC_TUNABLES, tuned_env
from bench.plan import Case, Contestant

REPO = pathlib.Path(__file__).resolve().parents[1]
REPLY_TIMEOUT_S = 1800.0  # the longest wait for one reply (a first call may compile for minutes)
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# "tuned": every contestant (cga_jax, PyTorch, ORT alike) runs with cga_jax.malloc's glibc
# tunables; "default": the environment as it is. Set by ``bench.run --malloc``.
MALLOC = "tuned"


class WorkerError(RuntimeError):
    pass


def pick_cpus(threads: int) -> list[int]:
    """The first ``threads`` CPUs this process may use (all of them if there are fewer)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:threads]


def worker_env(kind: str, threads: int, devices: int = 1) -> dict[str, str]:
    """Environment of a contestant process: thread counts for every runtime, CPU-only JAX/torch,
    for cga_jax at one thread XLA's single-threaded Eigen (affinity does the rest), and for
    cga_jax on ``devices`` > 1 that many XLA host devices."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if kind == "cga_jax":
        ours = [XLA_ONE_THREAD if threads == 1 else "", _device_count_flag(devices)]
        if flags := " ".join(filter(None, [env.get("XLA_FLAGS"), *ours])):
            env["XLA_FLAGS"] = flags
    if MALLOC == "tuned":
        env = tuned_env(env)
    return env


def _device_count_flag(devices: int) -> str:
    """The XLA flag for ``devices`` host devices ("" for the default single device)."""
    return f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""


def thread_settings(kind: str, threads: int, devices: int = 1) -> str:
    """How ``threads`` is enforced, in words (for the report)."""
    pin = f"affinity {threads} CPU(s), OMP/MKL_NUM_THREADS={threads}"
    if MALLOC == "tuned":
        pin += ", GLIBC_TUNABLES=" + ":".join(MALLOC_TUNABLES)
    if kind == "cga_jax":
        extra = f"XLA_FLAGS='{XLA_ONE_THREAD}'" if threads == 1 else "XLA default thread pool"
        if devices > 1:
            extra += (
                f", {devices} host devices ({_device_count_flag(devices)}), batch sharded over them"
            )
        return f"{pin}, {extra}"
    if kind == "torch":
        return f"{pin}, torch.set_num_threads({threads}), set_num_interop_threads(1)"
    return f"{pin}, intra_op_num_threads={threads}, inter_op 1, sequential"


class Worker:
    """A contestant process speaking the line protocol of :mod:`bench.worker`."""

    def __init__(self, spec: dict[str, Any], log_path: pathlib.Path):
        self.spec = spec
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=worker_env(spec["kind"], spec["threads"], spec["devices"]),
            cwd=REPO,
            text=True,
        )

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        # one line per reply, so nothing is left in the pipe's buffer between replies
        if not select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)[0]:
            self.kill()
            raise WorkerError(f"{self.spec['name']}: no reply in {REPLY_TIMEOUT_S:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(
                f"{self.spec['name']} died (rc {self.proc.returncode}):\n{self.tail()}"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"{self.spec['name']} failed:\n{msg['error']}")
        return msg

    def _send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def ready(self) -> dict[str, Any]:
        return self._recv()

    def run(self) -> float:
        self._send("run")
        return float(self._recv()["seconds"])

    def stop(self) -> dict[str, Any]:
        self._send("stop")
        msg = self._recv()
        self.proc.wait(timeout=60)
        self._log.close()
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def _spec(case: Case, c: Contestant, opts: dict[str, Any], files: dict[str, str]) -> dict:
    return {
        "name": f"{case.name}-{c.kind}-{c.mode}",
        "kind": c.kind,
        "task": case.task,
        "mode": c.mode,
        "variant": case.variant,
        "batch": case.batch,
        "threads": case.threads,
        "devices": c.devices(case.threads),
        "cpus": pick_cpus(case.threads),
        "iters": case.iters,
        "warmup": opts["warmup"] if case.repeats != 0 else 0,
        "rewarm": opts.get("rewarm", 0),
        "weights": files["weights"],
        "onnx": files.get(f"onnx_b{case.batch}"),
        "fused_impl": opts["fused_impl"],
        "out_dir": opts["tmp"],
    }


def _summarise(times: list[float], images: int) -> dict[str, Any]:
    rates = [images / t for t in times]
    if not rates:
        return {"img_s": rates}
    med = statistics.median(rates)
    return {
        "img_s": rates,
        "median_img_s": med,
        "spread": (max(rates) - min(rates)) / 2 / med,
    }


def run_case(case: Case, opts: dict[str, Any], files: dict[str, str], log=print) -> dict:
    """Start every contestant (one after the other, so first-call times are not disturbed),
    then time them alternately - A B C A B C ... - ``repeats`` times; then stop them all."""
    repeats = opts["repeats"] if case.repeats is None else case.repeats
    out: dict[str, Any] = {"case": case.name, "contestants": []}
    workers: list[tuple[Contestant, Worker, dict]] = []
    t_case = time.perf_counter()
    try:
        for c in case.contestants:
            spec = _spec(case, c, opts, files)
            w = Worker(spec, pathlib.Path(opts["tmp"]) / f"{spec['name']}.log")
            workers.append((c, w, {}))
            info = w.ready()
            workers[-1][2].update(info)
            log(f"    {c.label:15s} ready: first call {info['first_call_s']:.2f}s")
        times: dict[str, list[float]] = {c.label: [] for c, _, _ in workers}
        for _ in range(repeats):
            for c, w, _ in workers:
                times[c.label].append(w.run())
        for c, w, info in workers:
            final = w.stop()
            images = case.iters * info["images_per_step"]
            out["contestants"].append(
                {
                    "label": c.label,
                    "kind": c.kind,
                    "mode": c.mode,
                    "threads": thread_settings(c.kind, case.threads, w.spec["devices"]),
                    "seconds": times[c.label],
                    **_summarise(times[c.label], images),
                    **info,
                    **final,
                }
            )
    finally:
        for _, w, _ in workers:
            w.kill()
    out["wall_s"] = time.perf_counter() - t_case
    return out
