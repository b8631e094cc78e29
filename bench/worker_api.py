"""What a task builder hands the worker loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Task:
    """``step()`` runs one synchronous iteration (forward or train step) and returns its output
    (logits or loss); ``images_per_step`` converts time to throughput."""

    step: Callable[[], Any]
    images_per_step: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
