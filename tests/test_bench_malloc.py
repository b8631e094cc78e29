"""bench.malloc: the glibc allocator tunables that the benchmark and `make demo` launch with."""

from __future__ import annotations

import pathlib

import bench.malloc
from bench.malloc import MALLOC_TUNABLES, is_tuned, tuned_env


def test_tuned_env_adds_and_keeps():
    env = tuned_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == ":".join(MALLOC_TUNABLES)
    assert is_tuned(env) and not is_tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    # a user's own values win and unrelated tunables stay
    mine = "glibc.malloc.hugetlb=0:glibc.pthread.rseq=0"
    env = tuned_env({"GLIBC_TUNABLES": mine})
    parts = env["GLIBC_TUNABLES"].split(":")
    assert parts[:2] == mine.split(":")
    assert "glibc.malloc.hugetlb=1" not in parts
    assert sum(p.startswith("glibc.malloc.mmap_threshold=") for p in parts) == 1
    assert tuned_env(env) == env  # idempotent


def test_makefile_and_docs_use_the_same_tunables():
    root = pathlib.Path(__file__).resolve().parents[1]
    want = "GLIBC_TUNABLES=" + ":".join(MALLOC_TUNABLES)
    assert want in (root / "Makefile").read_text()
    assert want in (root / "README.md").read_text()
    assert want in bench.malloc.__doc__
