"""Process-0 output: JSONL and tensorboardX scalars, the tqdm bar, a PNG of the curves at the end."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm


class Logger:
    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "log.jsonl")
        self.tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # optional
                self.tb = None

    def write(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A tqdm bar over the run's steps (only where ``enabled``) showing the last logged loss,
    the images/s since the previous report and the share of that time spent waiting for input."""

    def __init__(self, enabled: bool, total: int, initial: int, batch_size: int):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.batch_size = batch_size
        self._time, self._step, self._wait = time.perf_counter(), initial, 0.0

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, loss: float, input_wait_s: float) -> float:
        """``input_wait_s``: the run's total time waiting for batches so far. Returns the share
        of the wall time since the previous report spent waiting (0: never)."""
        now = time.perf_counter()
        dt = max(now - self._time, 1e-9)
        ips = (step - self._step) * self.batch_size / dt
        wait = (input_wait_s - self._wait) / dt
        self._time, self._step, self._wait = now, step, input_wait_s
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", wait=f"{wait:.0%}")
        return min(1.0, wait)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_log(path: str) -> list[dict]:
    """Records of a JSONL log; a step logged twice (re-run after a resume) keeps the last."""
    by_key: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_key[(r["step"], tuple(sorted(r)))] = r
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_curves(log_path: str, png_path: str) -> str:
    """Train loss, validation top-1 (model and EMA) and lr against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in (
        (axes[0], ("train_loss",), "loss"),
        (axes[1], ("val_top1", "val_top1_ema"), "top-1 (%)"),
        (axes[2], ("lr",), "learning rate"),
    ):
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
