"""Repeated augmentation: DeiT RASampler order as a Grain sampler, exact resume."""

from __future__ import annotations

import collections

import grain.python as grain
import numpy as np
import pytest

from cga_jax.training import data as data_lib
from cga_jax.training.recipe import digits
from cga_jax.training.sampler import RepeatAugSampler


def deit_rasampler(n, num_replicas, rank, perm, repeats=3):
    """DeiT ``RASampler.__iter__`` for one epoch with a given permutation (plain Python)."""
    num_samples = -(-n * repeats // num_replicas)
    total = num_samples * num_replicas
    idx = [i for i in perm for _ in range(repeats)]
    idx += idx[: total - len(idx)]
    selected = n // 256 * 256 // num_replicas
    return idx[rank:total:num_replicas][:selected]


@pytest.mark.parametrize("procs", [1, 2, 3])
def test_matches_deit_rasampler(procs):
    n = 600
    samplers = [RepeatAugSampler(n, grain.ShardOptions(p, procs), seed=4) for p in range(procs)]
    for epoch in range(2):
        perm = samplers[0].permutation(epoch).tolist()
        for p, s in enumerate(samplers):
            per = s.epoch_size // procs
            got = [s[(epoch * per + k) * procs + p].record_key for k in range(per)]
            assert got == deit_rasampler(n, procs, p, perm)


def test_epoch_multiset_and_repeats():
    n, procs = 512, 2
    samplers = [RepeatAugSampler(n, grain.ShardOptions(p, procs), seed=0) for p in range(procs)]
    keys = [samplers[g % procs][g].record_key for g in range(samplers[0].epoch_size)]
    counts = collections.Counter(keys)
    assert len(keys) == 512 and len(counts) == 171  # ceil(512 / 3) distinct images
    assert sorted(counts.values()) == [2] + [3] * 170
    for g in range(0, 510, 3):  # each image 3x, consecutively in the global order
        assert keys[g] == keys[g + 1] == keys[g + 2]
        # ... so the copies go to different processes, and to none twice at the same time
    by_proc = [keys[p::procs] for p in range(procs)]
    assert by_proc[0] != by_proc[1]
    rngs = [samplers[g % procs][g].rng.integers(1 << 30) for g in range(3)]
    assert len(set(rngs)) == 3  # different augmentation randomness for the copies
    next_epoch = [samplers[g % procs][g].record_key for g in range(512, 1024)]
    assert next_epoch != keys  # a new permutation


def _loader(src, pid, procs, repeats=3, batch=6):
    cfg = digits()  # crop, flip, random erasing; no RandAugment
    cfg.img_size, cfg.batch_size = 8, batch * procs
    cfg.data.update(aug="rrc_flip", repeated_aug=repeats, reprob=0.25)
    return data_lib.train_loader(cfg, src, pid, procs, seed=1)


def test_loader_repeats_differ_and_resume_is_exact():
    src = data_lib.DigitsSource("train", size=8, val_size=1500)  # 297 images
    it = iter(_loader(src, 0, 1))
    b = next(it)
    # label triplets: the same image three times, each differently augmented
    assert (b["label"][0::3] == b["label"][1::3]).all() and (
        b["label"][0::3] == b["label"][2::3]
    ).all()
    assert not np.array_equal(b["image"][0], b["image"][1])
    assert b["erase"].shape == (6, 4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(_loader(src, 0, 1))
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in ("image", "label", "erase"):
            np.testing.assert_array_equal(got[k], w[k])


def test_processes_share_images_not_augmentations():
    src = data_lib.DigitsSource("train", size=8, val_size=1500)
    its = [iter(_loader(src, p, 3, batch=4)) for p in range(3)]
    b = [next(i) for i in its]
    # with 3 processes the 3 copies of an image go one to each, at the same local position
    for k in range(4):
        a0, a1, a2 = (b[p]["image"][k] for p in range(3))
        assert b[0]["label"][k] == b[1]["label"][k] == b[2]["label"][k]
        assert not np.array_equal(a0, a1) and not np.array_equal(a1, a2)
