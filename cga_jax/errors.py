"""The one error type of weight loading, conversion and downloads."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fetched or loaded; the message names every problem found
    and what to do about it."""
