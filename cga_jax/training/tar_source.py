"""Tar shards as a random-access Grain source: ImageNet-style ``<class>/<image>`` members.

``root`` is one ``.tar`` file or a directory of them (``train-0000.tar``, ...; sorted by name).
The index - shard, byte offset and size of every image member - is built once from the tar
headers (uncompressed tars only: random access needs plain offsets), so reading record ``i`` is
one seek and one read, in whichever worker process asks for it. Classes are the sorted set of
member directory names over all shards, as for a folder.
"""

from __future__ import annotations

import os
import pathlib
import tarfile

import grain.python as grain
import numpy as np

from cga_jax.preprocess import IMAGE_EXTS


class TarSource(grain.RandomAccessDataSource):
    """Records ``{"bytes": encoded image, "label": int32}``; decoding is :class:`Decode`'s job."""

    def __init__(self, root: str | os.PathLike):
        root = pathlib.Path(root)
        shards = sorted(root.glob("*.tar")) if root.is_dir() else [root]
        if not shards or not all(s.is_file() for s in shards):
            raise FileNotFoundError(f"no .tar shards at {root}")
        members: list[tuple[int, str, int, int]] = []  # (shard, class name, offset, size)
        for k, shard in enumerate(shards):
            try:
                with tarfile.open(shard, "r:") as tf:  # "r:" refuses compressed tars
                    for m in tf:
                        parts = m.name.strip("/").split("/")
                        if m.isfile() and len(parts) >= 2 and _is_image(parts[-1]):
                            members.append((k, parts[-2], m.offset_data, m.size))
            except tarfile.TarError as e:
                raise ValueError(f"{shard}: not an uncompressed tar ({e})") from e
        self.classes = sorted({c for _, c, _, _ in members})
        if not self.classes:
            raise FileNotFoundError(f"no <class>/<image> members in {root}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.shards = [str(s) for s in shards]
        self.samples = [(k, off, size, index[c]) for k, c, off, size in members]
        self.num_classes = len(self.classes)
        self._files: dict[int, object] = {}
        self._pid = -1

    def __repr__(self) -> str:  # Grain checks it when a checkpointed iterator is restored
        return f"TarSource({len(self.samples)} images, {self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        k, off, size, label = self.samples[i]
        if self._pid != os.getpid():  # handles are per process (Grain workers fork or spawn)
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(k)
        if f is None:
            f = self._files[k] = open(self.shards[k], "rb")  # noqa: SIM115 - kept open
        f.seek(off)
        return {"bytes": f.read(size), "label": np.int32(label)}

    def __getstate__(self):  # open files do not pickle
        return {**self.__dict__, "_files": {}, "_pid": -1}


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS
