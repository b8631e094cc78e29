"""Start contestant processes with the right environment and time them alternately.

CPU cases: one process per contestant and case, pinned to ``case.threads`` CPUs. Accelerator
cases: one process per framework (:class:`Pool`), unpinned, that builds and drops each case's
contestants in turn; the JAX and PyTorch processes share the device (each may take
``GPU_MEM_FRACTION`` of its memory).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import select
import statistics
import subprocess
import sys
import time
from typing import IO, Any

from bench.cases import Case, Contestant
from bench.common import GPU_MEM_FRACTION
from bench.malloc import MALLOC_TUNABLES, tuned_env

REPO = pathlib.Path(__file__).resolve().parents[1]
REPLY_TIMEOUT_S = 1800.0  # the longest wait for one reply (a first call may compile for minutes)
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# "tuned": every contestant (cga_jax, PyTorch, ORT alike) runs with bench.malloc's glibc
# tunables; "default": the environment as it is. Set by ``bench.run --malloc``.
MALLOC = "tuned"


class WorkerError(RuntimeError):
    pass


class OutOfTime(WorkerError):
    """The run's time budget ran out while waiting for a worker."""


def pick_cpus(threads: int) -> list[int]:
    """The first ``threads`` CPUs this process may use (all of them if there are fewer)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:threads]


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return tuned_env(env) if MALLOC == "tuned" else env


def worker_env(kind: str, threads: int, devices: int = 1) -> dict[str, str]:
    """Environment of a CPU contestant process: thread counts for every runtime, CPU-only
    JAX/torch, for cga_jax at one thread XLA's single-threaded Eigen (affinity does the rest),
    and for cga_jax on ``devices`` > 1 that many XLA host devices."""
    env = _base_env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    if kind == "cga_jax":
        ours = [XLA_ONE_THREAD if threads == 1 else "", _device_count_flag(devices)]
        if flags := " ".join(filter(None, [env.get("XLA_FLAGS"), *ours])):
            env["XLA_FLAGS"] = flags
    return env


def accel_env(platform: str) -> dict[str, str]:
    """Environment of an accelerator worker: one GPU (the first of ``CUDA_VISIBLE_DEVICES``, else
    device 0), JAX on CUDA without preallocation and capped at ``GPU_MEM_FRACTION`` of the
    memory, no thread settings. ``platform='cpu'``: the same code path on the CPU (a check of
    the harness, not a measurement)."""
    env = _base_env()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{GPU_MEM_FRACTION:.2f}"
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["JAX_PLATFORMS"] = platform
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0] or "0"
    return env


def _device_count_flag(devices: int) -> str:
    """The XLA flag for ``devices`` host devices ("" for the default single device)."""
    return f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""


def _malloc_words() -> str:
    return ", GLIBC_TUNABLES=" + ":".join(MALLOC_TUNABLES) if MALLOC == "tuned" else ""


def thread_settings(kind: str, threads: int, devices: int = 1) -> str:
    """How ``threads`` is enforced, in words (for the report)."""
    pin = f"affinity {threads} CPU(s), OMP/MKL_NUM_THREADS={threads}" + _malloc_words()
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


def accel_settings(platform: str) -> str:
    """The accelerator workers' environment, in words (for the report)."""
    where = "CPU (JAX_PLATFORMS=cpu, no CUDA device)" if platform == "cpu" else (
        f"one GPU (CUDA_VISIBLE_DEVICES={accel_env(platform)['CUDA_VISIBLE_DEVICES']}), "
        f"JAX_PLATFORMS={platform}"
    )  # fmt: skip
    return (
        f"{where}; processes not pinned, no thread settings; JAX: "
        f"XLA_PYTHON_CLIENT_PREALLOCATE=false, XLA_PYTHON_CLIENT_MEM_FRACTION="
        f"{GPU_MEM_FRACTION:.2f}; PyTorch: "
        f"set_per_process_memory_fraction({GPU_MEM_FRACTION:.2f}), "
        "TF32 allowed for matmuls and cuDNN (torch.backends.cuda.matmul.allow_tf32 = "
        "torch.backends.cudnn.allow_tf32 = True), cudnn.benchmark = True" + _malloc_words()
    )


class Worker:
    """A process speaking the line protocol of :mod:`bench.worker`."""

    def __init__(
        self,
        proc: dict[str, Any],
        env: dict[str, str],
        log_path: pathlib.Path,
        deadline: float | None = None,
    ):
        self.proc_spec = proc
        self.name = proc["name"]
        self.log_path = log_path
        self.deadline = deadline
        self._log: IO[str] = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", json.dumps(proc)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=REPO,
            text=True,
        )
        self.hello = self._recv()

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timeout = REPLY_TIMEOUT_S
        if self.deadline is not None:
            timeout = min(timeout, max(0.0, self.deadline - time.monotonic()))
        # one line per reply, so nothing is left in the pipe's buffer between replies
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.kill()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise OutOfTime(f"{self.name}: the run's time budget ran out")
            raise WorkerError(f"{self.name}: no reply in {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"{self.name} died (rc {self.proc.returncode}):\n{self.tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"{self.name} failed:\n{msg['error']}")
        return msg

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def build(self, task_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self._ask({"cmd": "build", "id": task_id, "spec": spec})

    def run(self, task_id: str, iters: int, rewarm: int = 0) -> float:
        msg = self._ask({"cmd": "run", "id": task_id, "iters": iters, "rewarm": rewarm})
        return float(msg["seconds"])

    def drop(self, task_id: str) -> dict[str, Any]:
        return self._ask({"cmd": "drop", "id": task_id})

    def stop(self) -> dict[str, Any]:
        msg = self._ask({"cmd": "stop"})
        self.proc.wait(timeout=60)
        self._log.close()
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


class Pool:
    """One accelerator worker per framework, started on first use and kept for the run."""

    def __init__(self, platform: str, log_dir: pathlib.Path, deadline: float | None = None):
        self.platform = platform
        self.log_dir = log_dir
        self.deadline = deadline
        self.workers: dict[str, Worker] = {}
        self.hellos: dict[str, dict[str, Any]] = {}  # kind -> the first hello (platform info)
        self._starts = 0

    def get(self, kind: str) -> Worker:
        w = self.workers.get(kind)
        if w is None or not w.alive():
            self._starts += 1
            name = f"accel-{kind}-{self._starts}"
            proc = {"name": name, "kind": kind, "platform": self.platform}
            w = Worker(proc, accel_env(self.platform), self.log_dir / f"{name}.log", self.deadline)
            self.workers[kind] = w
            self.hellos.setdefault(kind, w.hello)
        return w

    def discard(self, kind: str) -> None:
        w = self.workers.pop(kind, None)
        if w is not None:
            w.kill()

    def close(self) -> None:
        for kind in list(self.workers):
            w = self.workers.pop(kind)
            try:
                if w.alive():
                    w.stop()
            except WorkerError:
                pass
            finally:
                w.kill()


def _spec(case: Case, c: Contestant, opts: dict[str, Any], files: dict[str, str]) -> dict:
    accel = case.device != "cpu"
    return {
        "name": f"{case.name}-{c.kind}-{c.mode}-{c.dtype}",
        "kind": c.kind,
        "task": case.task,
        "mode": c.mode,
        "dtype": c.dtype,
        "variant": case.variant,
        "batch": case.batch,
        "threads": case.threads,
        "warmup": opts["warmup"] if case.repeats != 0 else 0,
        "warmup_s": (case.repeat_s or 0.0) if accel and case.repeats != 0 else 0.0,
        "probe_oom": accel,
        "weights": files["weights"],
        "onnx": files.get(f"onnx_b{case.batch}"),
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


def _iters(case: Case, ready: dict[str, Any]) -> int:
    """Iterations per timed repeat: ``case.iters``, or on an accelerator as many as fill
    ``case.repeat_s`` at the warm-up's step time (at least ``case.iters``)."""
    if case.device == "cpu" or not case.repeat_s:
        return case.iters
    return max(case.iters, math.ceil(case.repeat_s / max(ready["step_s"], 1e-6)))


def run_case(
    case: Case,
    opts: dict[str, Any],
    files: dict[str, str],
    pool: Pool | None = None,
    log=print,
    deadline: float | None = None,
) -> dict:
    """Build every contestant (one after the other, so first-call times are not disturbed),
    then time them alternately - A B C A B C ... - ``repeats`` times; then drop them all.

    CPU cases start (and stop) one process per contestant; accelerator cases use ``pool``.
    """
    accel = case.device != "cpu"
    if accel and pool is None:
        raise ValueError(f"{case.name}: an accelerator case needs a worker pool")
    repeats = opts["repeats"] if case.repeats is None else case.repeats
    out: dict[str, Any] = {"case": case.name, "contestants": []}
    started: list[tuple[Contestant, Worker, str, dict[str, Any]]] = []
    t_case = time.perf_counter()
    ok = False
    try:
        for c in case.contestants:
            spec = _spec(case, c, opts, files)
            if accel:
                assert pool is not None
                w = pool.get(c.kind)
            else:
                proc = {"name": spec["name"], "kind": c.kind, "threads": case.threads,
                        "cpus": pick_cpus(case.threads)}  # fmt: skip
                env = worker_env(c.kind, case.threads, c.devices(case.threads))
                log_path = pathlib.Path(opts["tmp"]) / f"{spec['name']}.log"
                w = Worker(proc, env, log_path, deadline)
            started.append((c, w, c.label, {}))
            info = w.build(c.label, spec)
            started[-1][3].update(info, iters=_iters(case, info))
            batch = f" (batch {info['batch']})" if info["batch"] != case.batch else ""
            log(f"    {c.label:26s} ready: first call {info['first_call_s']:.2f}s{batch}")
        times: dict[str, list[float]] = {c.label: [] for c, *_ in started}
        for _ in range(repeats):
            for c, w, task_id, info in started:
                times[c.label].append(w.run(task_id, info["iters"], opts.get("rewarm", 0)))
        for c, w, task_id, info in started:
            final = w.drop(task_id)
            if not accel:
                final = w.stop()
            images = info["iters"] * info["images_per_step"]
            settings = (
                accel_settings(pool.platform)
                if accel and pool is not None
                else thread_settings(c.kind, case.threads, c.devices(case.threads))
            )
            out["contestants"].append(
                {
                    "label": c.label,
                    "kind": c.kind,
                    "mode": c.mode,
                    "dtype": c.dtype,
                    "threads": settings,
                    "seconds": times[c.label],
                    **_summarise(times[c.label], images),
                    **{k: v for k, v in w.hello.items() if k != "platform"},
                    **info,
                    **final,
                }
            )
        ok = True
    finally:
        if accel and pool is not None:
            if not ok:  # a worker may be mid-command or broken: start afresh next case
                for kind in {c.kind for c, *_ in started}:
                    pool.discard(kind)
        else:
            for _, w, _, _ in started:
                w.kill()
    out["wall_s"] = time.perf_counter() - t_case
    return out
