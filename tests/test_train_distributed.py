"""Two ``jax.distributed`` processes on localhost (CPU, gloo collectives) train the same steps as
one process with two devices, and agree with each other."""

from __future__ import annotations

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
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (out + err)[-3000:]


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
def test_train_py_two_processes_checkpoint_and_resume(tmp_path):
    """train.py end to end with ``--multiprocess``: both processes train, evaluate (every image
    once), save a shared Orbax checkpoint and resume from it."""
    from tests.train_helpers import train_cmd

    flags = ["--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=4"]

    def cmd(total: int, port: int):
        return lambda pid: train_cmd(
            tmp_path,
            f"--config.total_steps={total}",
            *flags,
            "--multiprocess",
            f"--coordinator=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
        )

    _two_processes(cmd(4, _free_port()), {"JAX_PLATFORMS": "cpu"})
    assert (tmp_path / "checkpoints" / "4").is_dir()
    _two_processes(cmd(6, _free_port()), {"JAX_PLATFORMS": "cpu"})
    assert (tmp_path / "checkpoints" / "6").is_dir()
    from cga_jax.training.logger import read_log

    recs = read_log(str(tmp_path / "log.jsonl"))
    steps = [r["step"] for r in recs if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "val_top1" in r] == [4, 6]
