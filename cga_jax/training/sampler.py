"""Repeated augmentation (DeiT ``RASampler`` / timm ``RepeatAugSampler``) as a Grain sampler.

DeiT, per epoch ``e``: a permutation of the dataset (seeded by the epoch), every index repeated
``repeats`` times in a row, padded to a multiple of the number of replicas, replica ``r`` takes
positions ``r, r + R, r + 2R, ...`` (so the copies of an image go to different replicas), and
each replica stops after ``floor(N // 256 * 256 / R)`` samples: an epoch still has about ``N``
samples, i.e. about ``N / repeats`` distinct images, each seen ``repeats`` times.

Grain's ``DataLoader`` asks the sampler for global index ``g = k * P + p`` (process ``p``'s
``k``-th record). Here ``g`` is the position in the concatenation of the DeiT epochs, with the
processes as the replicas: epoch ``g // L`` (``L`` = samples per epoch of all processes), position
``g % L`` of that epoch's repeated permutation. The map is a pure function of ``g``, so Grain's
iterator state (the last index seen) resumes exactly; the record rng is Philox(seed + g), as in
Grain's ``IndexSampler``, so the copies of an image get different augmentations. Within one
process the copies sit at neighbouring positions of the local batch; BN statistics here cover the
global batch, so where the copies land does not matter.
"""

from __future__ import annotations

import sys

import grain.python as grain
import numpy as np


class RepeatAugSampler:
    """Endless Grain sampler: DeiT repeated-augmentation order over ``num_records`` records.

    Args:
      num_records: dataset size ``N``.
      shard_options: this process's ``grain.ShardOptions`` (index, count = number of replicas).
      repeats: copies of each selected image per epoch (3 in DeiT).
      seed: shuffling and record-rng seed.
      selected_round: the per-epoch sample count is ``N // selected_round * selected_round``
        (DeiT: 256); 0 keeps ``ceil(N / P) * P``.
    """

    def __init__(
        self,
        num_records: int,
        shard_options: grain.ShardOptions,
        repeats: int = 3,
        seed: int = 0,
        selected_round: int = 256,
    ):
        if num_records <= 0 or repeats < 1:
            raise ValueError(f"need num_records > 0 and repeats >= 1: {num_records}, {repeats}")
        self._num_records, self._repeats, self._seed = num_records, repeats, seed
        self._shard_options = shard_options  # the DataLoader takes the sharding from here
        p = shard_options.shard_count
        if selected_round and num_records >= selected_round:
            per_replica = num_records // selected_round * selected_round // p
        else:
            per_replica = -(-num_records // p)
        if per_replica < 1:
            raise ValueError(f"{num_records} records are too few for {p} processes")
        self.epoch_size = per_replica * p  # samples per epoch, all processes together
        self._selected_round = selected_round
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def __repr__(self) -> str:  # Grain compares it when a checkpointed iterator is restored
        return (
            f"RepeatAugSampler(num_records={self._num_records}, "
            f"shard_options={self._shard_options!r}, repeats={self._repeats}, "
            f"seed={self._seed}, selected_round={self._selected_round})"
        )

    def __len__(self) -> int:
        return sys.maxsize

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's shuffled record order (cached: one epoch at a time)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self._num_records), epoch
        return self._perm

    def record_key(self, index: int) -> int:
        epoch, pos = divmod(index, self.epoch_size)
        pos %= self._num_records * self._repeats  # DeiT's padding wraps to the start
        return int(self.permutation(epoch)[pos // self._repeats])

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"negative index {index}")
        rng = np.random.Generator(np.random.Philox(key=self._seed + index))
        return grain.RecordMetadata(index=index, record_key=self.record_key(index), rng=rng)
