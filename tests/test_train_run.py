"""End-to-end training runs on the bundled digits data (tiny model, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cga_jax.training.logger import read_log
from tests.train_helpers import ROOT, env, run, tiny_digits_config, train_cmd


def test_short_run_learns(tmp_path):
    """Loss falls and validation accuracy rises well above chance (10%) in 90 steps."""
    from cga_jax.training.trainer import train_and_evaluate

    cfg = tiny_digits_config(
        **{
            "total_steps": 90,
            "optim.epochs": 2,
            "optim.lr": 0.08,
            "optim.warmup_epochs": 0.2,
            "log_every": 5,
            "eval_every": 90,
            "checkpoint_every": 90,
        }
    )
    res = train_and_evaluate(cfg, str(tmp_path))
    recs = [r for r in read_log(str(tmp_path / "log.jsonl")) if "train_loss" in r]
    first = np.mean([r["train_loss"] for r in recs[:5]])
    last = np.mean([r["train_loss"] for r in recs[-5:]])
    print(f"loss {first:.3f} -> {last:.3f}; val top-1 {res['val_top1']:.1f}%")
    assert last < first - 0.5
    assert res["val_top1"] >= 60.0
    assert res["step"] == 90 and os.path.exists(res["curves"])
    assert os.path.isdir(os.path.join(res["checkpoint"], "90"))
    # the share of each logging window the step waited for input
    waits = [r for r in read_log(str(tmp_path / "log.jsonl")) if "input_wait" in r]
    assert [r["step"] for r in waits] == list(range(5, 91, 5))
    assert all(0.0 <= r["input_wait"] <= 1.0 for r in waits)


def _losses(workdir):
    return {
        r["step"]: r["train_loss"]
        for r in read_log(os.path.join(workdir, "log.jsonl"))
        if "train_loss" in r
    }


RESUME_FLAGS = [
    "--config.total_steps=24",
    "--config.checkpoint_every=8",
    "--config.log_every=1",
    "--config.eval_every=24",
    "--config.aug.mixup=0.8",
    "--config.aug.cutmix=1.0",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the 24-step run of the resume tests, never interrupted."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    r = run(train_cmd(ref, *RESUME_FLAGS))
    assert r.returncode == 0, r.stderr[-3000:]
    return ref


def _wait_for(cond, proc, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _assert_same_run(ref, cut) -> None:
    """Every step's loss and every evaluation bit-exact, the data order included (the loss of a
    step depends on its batch)."""
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert [a[s] for s in a] == [b[s] for s in a]
    ea = [r for r in read_log(str(ref / "log.jsonl")) if "val_top1" in r]
    eb = [r for r in read_log(str(cut / "log.jsonl")) if "val_top1" in r]
    assert ea == eb and len(ea) == 1


def _start(cmd):
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill9_resume_is_bit_exact(tmp_path, uninterrupted):
    cut = tmp_path / "cut"
    p = _start(train_cmd(cut, *RESUME_FLAGS))
    _wait_for(
        lambda: (
            (cut / "checkpoints" / "8").is_dir()  # a finalised checkpoint to resume from
            and os.path.exists(cut / "log.jsonl")
            and max(_losses(cut), default=0) >= 13
        ),
        p,
        "step 13",
    )
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(_losses(cut))
    assert 13 <= killed_at < 24
    r = run(train_cmd(cut, *RESUME_FLAGS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    _assert_same_run(uninterrupted, cut)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, uninterrupted):
    """kill -9 while checkpoint 16 is being written (its files are down, the commit rename is
    not): step 8 stays the latest checkpoint, the restart resumes from it and repeats the run."""
    cut, marker = tmp_path / "cut", tmp_path / "writing-16"
    cmd = [sys.executable, str(ROOT / "tests/stalled_commit_train.py"), "16", str(marker)]
    p = _start(cmd + train_cmd(cut, *RESUME_FLAGS)[2:])
    _wait_for(marker.exists, p, "the write of checkpoint 16")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ckpts = os.listdir(cut / "checkpoints")
    assert "8" in ckpts and "16" not in ckpts, ckpts
    assert any(n.startswith("16.") and "tmp" in n for n in ckpts), ckpts  # the torn write
    r = run(train_cmd(cut, *RESUME_FLAGS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 8" in r.stdout + r.stderr  # "resumed from ... step 8"
    assert not any("tmp" in n for n in os.listdir(cut / "checkpoints"))  # cleaned up
    _assert_same_run(uninterrupted, cut)


@pytest.mark.slow
def test_sigterm_saves_exits_and_resumes(tmp_path, uninterrupted):
    """SIGTERM (a preempted TPU VM): the run saves the current step, exits 0, and the restart
    repeats the uninterrupted run bit for bit."""
    cut = tmp_path / "cut"
    p = _start(train_cmd(cut, *RESUME_FLAGS))
    _wait_for(
        lambda: os.path.exists(cut / "log.jsonl") and max(_losses(cut), default=0) >= 10,
        p,
        "step 10",
    )
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out[-3000:]
    stopped = max(_losses(cut))
    assert f"SIGTERM: saved step {stopped}" in out, out[-3000:]
    assert stopped < 24 and str(stopped) in os.listdir(cut / "checkpoints")
    r = run(train_cmd(cut, *RESUME_FLAGS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {stopped}" in r.stdout + r.stderr
    _assert_same_run(uninterrupted, cut)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    flags = ["--config.checkpoint_every=4", "--config.log_every=2", "--config.eval_every=100"]
    r = run(train_cmd(tmp_path, "--config.total_steps=4", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(train_cmd(tmp_path, "--config.total_steps=12", "--config.optim.lr=1e38", *flags))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "non-finite loss" in r.stderr and "last good checkpoint is step 4" in r.stderr
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [4]
    # the kept checkpoint still resumes: a sane run continues from step 4
    r = run(train_cmd(tmp_path, "--config.total_steps=6", *flags))
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
