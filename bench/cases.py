"""The plan's vocabulary: a section makes cases (one model, task, batch), each timed across its
contestants (one framework configuration each). No framework imports: the parent process uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

JAX = "cga_jax"  # the label of the cga_jax contestant that CPU-section targets refer to


@dataclasses.dataclass(frozen=True)
class Contestant:
    label: str  # shown in the report, e.g. "PyTorch traced"
    kind: str  # worker module: cga_jax | torch | ort
    mode: str  # cga_jax: folded | sharded | unfolded | train; torch: traced | eager | train ...
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16 (torch AMP)

    def devices(self, threads: int) -> int:
        """XLA host devices of a cga_jax process: one per thread for ``sharded``, else one."""
        return threads if self.kind == "cga_jax" and self.mode == "sharded" else 1


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: every contestant runs ``task`` on ``variant`` at ``batch``.

    ``device``: ``"cpu"`` (one pinned process per contestant, ``threads`` CPUs) or an accelerator
    (``"gpu"``; ``threads`` unused): one process per framework serves every case of the run,
    each case's contestants built in it and dropped afterwards.
    """

    section: str
    variant: str
    task: str  # infer | train
    batch: int
    threads: int
    contestants: tuple[Contestant, ...]
    iters: int  # iterations per timed repeat (accelerator cases: the minimum, see repeat_s)
    repeats: int | None = None  # None: the run's --repeats; 0: first call only (compile)
    # (baseline label, min ratio) with cga_jax's JAX contestant as numerator, or
    # (our label, baseline label, min ratio or None = reported without a target)
    targets: tuple[tuple[Any, ...], ...] = ()
    compile_target_s: float | None = None  # max first-call time of cga_jax
    device: str = "cpu"  # cpu | gpu
    repeat_s: float | None = None  # accelerator cases: iterations per repeat sized to this time
    # (contestant label, min img/s, what the figure is) checked on the median throughput
    abs_targets: tuple[tuple[str, float, str], ...] = ()

    @property
    def name(self) -> str:
        where = f"t{self.threads}" if self.device == "cpu" else self.device
        return f"{self.section}-{short(self.variant)}-{self.task}-b{self.batch}-{where}"

    @property
    def ratio_targets(self) -> tuple[tuple[str, str, float | None], ...]:
        """``targets`` as (ours, baseline, min ratio or None) triples."""
        return tuple((JAX, *t) if len(t) == 2 else tuple(t) for t in self.targets)


@dataclasses.dataclass(frozen=True)
class Section:
    """A ``--only`` section: ``make(variant, opts)`` gives its cases for one variant.

    ``opts`` holds the run's options (``iters_scale``, and those a section reads, e.g. the GPU
    batch). ``in_default_run``: part of a run without ``--only SECTION``.
    """

    name: str
    title: str
    variants: tuple[str, ...]
    make: Callable[[str, dict[str, Any]], list[Case]]
    in_default_run: bool = True


def short(variant: str) -> str:
    return variant.rsplit("_", 1)[-1]


def scaled(iters: int, opts: dict[str, Any]) -> int:
    """``iters`` times the run's ``--iters-scale``, at least 1."""
    return max(1, round(iters * opts.get("iters_scale", 1.0)))
