"""What is measured: sections -> cases (one model, batch, thread count) -> contestants.

Every section is a :class:`~bench.cases.Section` in :data:`REGISTRY`; the CPU sections are
defined here, the accelerator section in :mod:`bench.plan_gpu`. A new section is one module with
a ``Section`` and one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

from typing import Any

from bench import plan_gpu
from bench.cases import JAX, Case, Contestant, Section, scaled, short

__all__ = ["ALL_VARIANTS", "JAX", "REGISTRY", "Case", "Contestant", "Section", "short"]

ALL_VARIANTS = tuple(f"efficientvit_m{i}" for i in range(6))

JAX_FOLDED = Contestant(JAX, "cga_jax", "folded")
# Data-parallel over one XLA host device per thread, the batch sharded (as cga_jax.evaluate runs
# on several devices); the single-device run is reported beside it.
JAX_SHARDED = Contestant(JAX, "cga_jax", "sharded")
JAX_ONE_DEVICE = Contestant("cga_jax 1 device", "cga_jax", "folded")
JAX_TRAIN = Contestant(JAX, "cga_jax", "train")
TORCH_TRACED = Contestant("PyTorch traced", "torch", "traced")
TORCH_EAGER = Contestant("PyTorch eager", "torch", "eager")
TORCH_TRAIN = Contestant("PyTorch eager", "torch", "train")
ORT = Contestant("ONNX Runtime", "ort", "onnx")


def _official(v: str, opts: dict[str, Any]) -> list[Case]:
    return [
        Case("official", v, "infer", 16, 1, (JAX_FOLDED, TORCH_TRACED), scaled(30, opts),
             targets=(("PyTorch traced", 1.3),))
    ]  # fmt: skip


def _threads2(v: str, opts: dict[str, Any]) -> list[Case]:
    return [
        Case("threads2", v, "infer", 64, 2, (JAX_SHARDED, JAX_ONE_DEVICE, TORCH_EAGER, ORT),
             scaled(8, opts), targets=(("PyTorch eager", 1.3), ("ONNX Runtime", 1.0)))
    ]  # fmt: skip


def _train(v: str, opts: dict[str, Any]) -> list[Case]:
    return [
        Case("train", v, "train", 64, 2, (JAX_TRAIN, TORCH_TRAIN), scaled(3, opts),
             targets=(("PyTorch eager", 1.3),))
    ]  # fmt: skip


def _compile(v: str, opts: dict[str, Any]) -> list[Case]:
    return [
        Case("compile", v, "infer", 16, 2, (JAX_FOLDED,), 1, 0, compile_target_s=15),
        Case("compile", v, "train", 64, 2, (JAX_TRAIN,), 1, 0, compile_target_s=45),
    ]


M0_M4 = ("efficientvit_m0", "efficientvit_m4")
REGISTRY: dict[str, Section] = {
    s.name: s
    for s in (
        Section("official", "1. Official CPU protocol: BN folded, 1 thread, batch 16, 224x224",
                ALL_VARIANTS, _official),
        Section("threads2", "2. Inference, 2 threads, batch 64, BN folded", M0_M4, _threads2),
        Section("train", "3. Training step (fwd + bwd + AdamW), 2 threads, batch 64", M0_M4,
                _train),
        Section("compile", "4. Compile time: first call of the jitted function (cga_jax)",
                ("efficientvit_m5",), _compile),
        plan_gpu.SECTION,
    )
}  # fmt: skip
SECTIONS = tuple(REGISTRY)
SECTION_TITLES = {name: s.title for name, s in REGISTRY.items()}
DEFAULT_VARIANTS = {name: s.variants for name, s in REGISTRY.items() if s.in_default_run}


def build_plan(
    variants: dict[str, tuple[str, ...]], opts: dict[str, Any] | float | None = None
) -> list[Case]:
    """``variants``: section -> variants to run (sections absent are skipped), in that order.
    ``opts``: the run's options that sections read (``iters_scale``, GPU batch sizes...); a
    number is taken as ``iters_scale``."""
    if not isinstance(opts, dict):
        opts = {"iters_scale": 1.0 if opts is None else float(opts)}
    return [case for section, vs in variants.items() for v in vs
            for case in REGISTRY[section].make(v, opts)]  # fmt: skip


def _variant(token: str) -> str | None:
    token = token.lower()
    if token in ALL_VARIANTS:
        return token
    if f"efficientvit_{token}" in ALL_VARIANTS:
        return f"efficientvit_{token}"
    return None


def parse_only(items: list[str] | None) -> dict[str, tuple[str, ...]]:
    """``--only`` tokens (comma-separated, repeatable): ``SECTION`` (its default variants),
    ``SECTION:VARIANT[+VARIANT]`` (those variants in that section), ``VARIANT`` (keep only these
    variants in whichever sections are chosen; with no section named, in the default run's
    sections). Variants: ``m0`` or ``efficientvit_m0``."""
    chosen: dict[str, list[str]] = {}
    keep: set[str] = set()
    tokens = [t.strip() for item in items or [] for t in item.split(",") if t.strip()]
    for token in tokens:
        section, _, vs = token.partition(":")
        if section in REGISTRY:
            if vs:
                for v in vs.split("+"):
                    full = _variant(v)
                    if full is None:
                        raise ValueError(f"--only {token}: unknown variant {v!r}")
                    chosen.setdefault(section, []).append(full)
            else:
                chosen.setdefault(section, []).extend(REGISTRY[section].variants)
        elif (full := _variant(token)) is not None:
            keep.add(full)
        else:
            raise ValueError(f"--only {token}: not a section ({', '.join(REGISTRY)}) or variant")
    if not chosen:  # only bare variants (or nothing): every section of the default run
        chosen = {s: list(keep) if keep else list(vs) for s, vs in DEFAULT_VARIANTS.items()}
    out = {}
    for section, vs in chosen.items():
        vs = [v for v in dict.fromkeys(vs) if not keep or v in keep]
        if vs:
            out[section] = tuple(vs)
    return out
