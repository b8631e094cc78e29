"""ImageNet-1k class names and synset ids (package data, index order = sorted synset ids)."""

from __future__ import annotations

import functools
import importlib.resources


@functools.cache
def _read(name: str) -> tuple[str, ...]:
    text = importlib.resources.files("cga_jax").joinpath("data", name).read_text("utf-8")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(lines) == 1000, f"{name}: {len(lines)} lines, expected 1000"
    return lines


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, e.g. ``'tench, Tinca tinca'``) in the
    standard index order."""
    return list(_read("imagenet_classes.txt"))


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet synset ids (``'n01440764'`` ...), sorted = index order."""
    return list(_read("imagenet_synsets.txt"))


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
