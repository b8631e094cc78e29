"""Two ``jax.distributed`` processes on localhost (CPU, gloo collectives) train the same steps as
one process with two devices, and agree with each other."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train_helpers import ROOT, env, run

SCRIPT = str(ROOT / "tests/distributed_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(cmd_for, extra_env: dict, timeout: int = 900) -> None:
    procs = [
        subprocess.Popen(
            cmd_for(pid),
            env=env(extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            p.kill()
    for p, (_out, err) in zip(procs, outs, strict=True):  # the error lines, not the stack dumps
        why = [ln for ln in err.splitlines() if "Error" in ln or ln.startswith(("E1", "F1"))]
        assert p.returncode == 0, "\n".join(why[-20:]) or err[-3000:]


def test_two_processes_equal_one_process_two_devices(tmp_path):
    port = _free_port()
    cpu = {"JAX_PLATFORMS": "cpu"}
    _two_processes(
        lambda pid: [sys.executable, SCRIPT, str(ROOT), str(tmp_path), "dist", str(pid), str(port)],
        cpu,
    )
    r = run(
        [sys.executable, SCRIPT, str(ROOT), str(tmp_path), "local"],
        {**cpu, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d0, d1 = np.load(tmp_path / "dist-0.npz"), np.load(tmp_path / "dist-1.npz")
    ref = np.load(tmp_path / "local-0.npz")
    print("losses: dist", d0["loss"], "local", ref["loss"])
    assert sorted(d0.files) == sorted(d1.files) == sorted(ref.files)
    for k in d0.files:  # the two processes hold the same replicated state, bit for bit
        np.testing.assert_array_equal(d0[k], d1[k], err_msg=k)
    assert ref["loss"][-1] < ref["loss"][0] + 1.0 and np.all(np.isfinite(ref["loss"]))
    # same mesh shape, same per-device shards: equal up to the float32 reduction order
    np.testing.assert_allclose(d0["loss"], ref["loss"], rtol=2e-6)
    np.testing.assert_allclose(d0["grad_norm"], ref["grad_norm"], rtol=1e-5)
    for k in ref.files:
        if k.startswith(("p", "s")):
            scale = max(float(np.abs(ref[k]).max()), 1e-3)
            assert float(np.abs(d0[k] - ref[k]).max()) <= 1e-5 * scale, k


@pytest.mark.slow
def test_train_py_two_processes_resume_exactly(tmp_path):
    """train.py end to end with ``--multiprocess``: two processes train, evaluate (every image
    once), save one Orbax checkpoint (each process its own data-iterator state) and resume; the
    resumed run logs the same losses as an uninterrupted two-process run, bit for bit."""
    from cga_jax.training.logger import read_log
    from tests.train_helpers import train_cmd

    flags = ["--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=4"]

    def train(workdir, total: int) -> None:
        port = _free_port()
        _two_processes(
            lambda pid: train_cmd(
                workdir,
                f"--config.total_steps={total}",
                *flags,
                "--multiprocess",
                f"--coordinator=localhost:{port}",
                "--num_processes=2",
                f"--process_id={pid}",
            ),
            {"JAX_PLATFORMS": "cpu"},
        )

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(ref, 6)
    train(cut, 4)
    assert sorted(os.listdir(cut / "checkpoints" / "4" / "data")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    train(cut, 6)

    def log(workdir):
        recs = read_log(str(workdir / "log.jsonl"))
        return [(r["step"], r["train_loss"]) for r in recs if "train_loss" in r], [
            r for r in recs if "val_top1" in r
        ]

    (la, ea), (lb, eb) = log(ref), log(cut)
    assert [s for s, _ in la] == [1, 2, 3, 4, 5, 6]
    assert la == lb and ea == eb and [r["step"] for r in ea] == [4, 6]
