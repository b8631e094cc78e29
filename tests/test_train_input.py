"""The trainer's input side: device prefetch with exact loader state, input-wait logging, a run
with fast decode + device augmentation inside the step."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cga_jax.training.logger import read_log
from cga_jax.training.prefetch import DevicePrefetcher
from tests.train_helpers import tiny_digits_config


class _Counter:
    """A stateful iterator like Grain's: state = number of batches pulled."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.k, self.n, self.fail_at = 0, n, fail_at

    def __next__(self):
        if self.k == self.fail_at:
            raise OSError("unreadable shard")
        if self.k >= self.n:
            raise StopIteration
        self.k += 1
        return self.k

    def get_state(self):
        return {"k": self.k}


def test_prefetch_state_is_the_consumed_batch():
    feed = DevicePrefetcher(_Counter(10), lambda b: b * 10, size=3)
    assert feed.state == {"k": 0}
    for want in (10, 20, 30, 40):
        assert next(feed) == want
        assert feed.state == {"k": want // 10}  # not the batches still queued ahead
    assert list(feed) == [50, 60, 70, 80, 90, 100] and feed.state == {"k": 10}
    assert feed.take_wait() >= 0 and feed.take_wait() == 0
    feed.close()
    bad = DevicePrefetcher(_Counter(10, fail_at=2), lambda b: b)
    assert [next(bad), next(bad)] == [1, 2]
    with pytest.raises(OSError, match="unreadable shard"):
        next(bad)
    bad.close()


def _jpeg(seed: int) -> bytes:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(5, 6, 3) * 255).astype(np.uint8)).resize((70, 56))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_run_with_fast_decode_and_device_augmentation(tmp_path):
    """ImageNet-recipe input (fast decode, RandAugment + flip on the device, erasing) on a tiny
    JPEG folder: the jitted step takes the shipped draws and the loss stays finite."""
    from cga_jax.training.trainer import train_and_evaluate

    for split in ("train", "val"):
        for i in range(12):
            d = tmp_path / "data" / split / f"c{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.jpg").write_bytes(_jpeg(i + (100 if split == "val" else 0)))
    cfg = tiny_digits_config(
        total_steps=4, log_every=2, eval_every=4, checkpoint_every=4, batch_size=8
    )
    cfg.model.num_classes = 3
    cfg.eval_batch_size = 12
    cfg.data.update(
        name="folder",
        root=str(tmp_path / "data"),
        aug="rrc_flip",
        randaugment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        decode="fast",
        device_aug=True,
        crop_pct=0.875,
    )
    res = train_and_evaluate(cfg, str(tmp_path / "run"))
    recs = read_log(str(tmp_path / "run" / "log.jsonl"))
    losses = [r["train_loss"] for r in recs if "train_loss" in r]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert res["step"] == 4 and any("input_wait" in r for r in recs)


@pytest.mark.slow
def test_short_run_with_device_resize_learns(tmp_path):
    """data.device_resize on the digits (random-resized crops resampled inside the step): the
    loss falls and validation accuracy rises well above chance (10%) in 90 steps."""
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
    cfg.data.update(aug="rrc_flip", rrc_scale=(0.7, 1.0), hflip=0.0, decode="fast", device_aug=True)
    cfg.data.device_resize = True
    res = train_and_evaluate(cfg, str(tmp_path))
    recs = [r for r in read_log(str(tmp_path / "log.jsonl")) if "train_loss" in r]
    first = np.mean([r["train_loss"] for r in recs[:5]])
    last = np.mean([r["train_loss"] for r in recs[-5:]])
    print(f"loss {first:.3f} -> {last:.3f}; val top-1 {res['val_top1']:.1f}%")
    assert last < first - 0.5
    assert res["val_top1"] >= 60.0 and res["step"] == 90
