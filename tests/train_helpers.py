"""Shared helpers of the training tests: tiny configs and subprocess runs of train.py."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from cga_jax.training.recipe import digits

ROOT = pathlib.Path(__file__).resolve().parents[1]
# EfficientViTConfig fields of the tiny test model (M0 with these overrides)
TINY_MODEL = dict(
    embed_dim=(16, 24, 32),
    key_dim=(4, 4, 4),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    window_size=(2, 2, 2),
    kernels=(3, 3),
)


def tiny_digits_config(**over):
    """The digits demo config with the tiny model, batch 32, no progress bar; ``over``: dotted
    keys set afterwards (``tiny_digits_config(**{"optim.lr": 0.1})``)."""
    c = digits()
    c.model.update(TINY_MODEL)
    c.batch_size = 32
    c.eval_batch_size = 120
    c.progress = False
    c.update_from_flattened_dict(over)
    return c


def train_cmd(workdir, *flags: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/digits.py"),
        "--workdir",
        str(workdir),
        "--config.progress=False",
        "--config.model.embed_dim=(16,24,32)",
        "--config.model.key_dim=(4,4,4)",
        "--config.model.num_heads=(2,2,2)",
        "--config.batch_size=32",
        *flags,
    ]


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra or {})
    return e


def run(cmd, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
