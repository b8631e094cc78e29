"""End-to-end training runs on the bundled digits data (tiny model, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cga_jax.training.logger import read_log
from tests.train_helpers import env, run, tiny_digits_config, train_cmd


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


def _losses(workdir):
    return {
        r["step"]: r["train_loss"]
        for r in read_log(os.path.join(workdir, "log.jsonl"))
        if "train_loss" in r
    }


@pytest.mark.slow
def test_kill9_resume_is_bit_exact(tmp_path):
    flags = [
        "--config.total_steps=24",
        "--config.checkpoint_every=8",
        "--config.log_every=1",
        "--config.eval_every=24",
        "--config.aug.mixup=0.8",
        "--config.aug.cutmix=1.0",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = run(train_cmd(ref, *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(
        train_cmd(cut, *flags), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 400
    while time.time() < deadline:
        done = (cut / "checkpoints" / "8").is_dir()  # a finalised checkpoint to resume from
        if done and os.path.exists(cut / "log.jsonl") and max(_losses(cut), default=0) >= 13:
            break
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(_losses(cut))
    assert 13 <= killed_at < 24
    r = run(train_cmd(cut, *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit-exact, every step
    ea = [r for r in read_log(str(ref / "log.jsonl")) if "val_top1" in r]
    eb = [r for r in read_log(str(cut / "log.jsonl")) if "val_top1" in r]
    assert ea == eb


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
