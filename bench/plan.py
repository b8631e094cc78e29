"""What is measured: sections -> cases (one model, batch, thread count) -> contestants."""

from __future__ import annotations

import dataclasses

ALL_VARIANTS = tuple(f"efficientvit_m{i}" for i in range(6))
SECTIONS = ("official", "threads2", "train", "compile")
JAX = "cga_jax"


@dataclasses.dataclass(frozen=True)
class Contestant:
    label: str  # shown in the report, e.g. "PyTorch traced"
    kind: str  # worker module: cga_jax | torch | ort
    mode: str  # cga_jax: folded | sharded | unfolded; torch: traced | eager; ort: onnx; train

    def devices(self, threads: int) -> int:
        """XLA host devices of a cga_jax process: one per thread for ``sharded``, else one."""
        return threads if self.kind == "cga_jax" and self.mode == "sharded" else 1


@dataclasses.dataclass(frozen=True)
class Case:
    section: str
    variant: str
    task: str  # infer | train
    batch: int
    threads: int
    contestants: tuple[Contestant, ...]
    iters: int  # iterations per timed repeat
    repeats: int | None = None  # None: the run's --repeats; 0: first call only (compile)
    targets: tuple[tuple[str, float], ...] = ()  # (baseline label, min cga_jax/baseline)
    compile_target_s: float | None = None  # max first-call time of cga_jax

    @property
    def name(self) -> str:
        return f"{self.section}-{short(self.variant)}-{self.task}-b{self.batch}-t{self.threads}"


def short(variant: str) -> str:
    return variant.rsplit("_", 1)[-1]


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

SECTION_TITLES = {
    "official": "1. Official CPU protocol: BN folded, 1 thread, batch 16, 224x224",
    "threads2": "2. Inference, 2 threads, batch 64, BN folded",
    "train": "3. Training step (fwd + bwd + AdamW), 2 threads, batch 64",
    "compile": "4. Compile time: first call of the jitted function (cga_jax)",
}


def build_plan(variants: dict[str, tuple[str, ...]], scale: float = 1.0) -> list[Case]:
    """``variants``: section -> variants to run (sections absent are skipped)."""

    def n(iters: int) -> int:
        return max(1, round(iters * scale))

    cases: list[Case] = []
    for v in variants.get("official", ()):
        cases.append(
            Case("official", v, "infer", 16, 1, (JAX_FOLDED, TORCH_TRACED), n(30),
                 targets=(("PyTorch traced", 1.3),))
        )  # fmt: skip
    for v in variants.get("threads2", ()):
        cases.append(
            Case("threads2", v, "infer", 64, 2, (JAX_SHARDED, JAX_ONE_DEVICE, TORCH_EAGER, ORT),
                 n(8),
                 targets=(("PyTorch eager", 1.3), ("ONNX Runtime", 1.0)))
        )  # fmt: skip
    for v in variants.get("train", ()):
        cases.append(
            Case("train", v, "train", 64, 2, (JAX_TRAIN, TORCH_TRAIN), n(3),
                 targets=(("PyTorch eager", 1.3),))
        )  # fmt: skip
    for v in variants.get("compile", ()):
        cases.append(Case("compile", v, "infer", 16, 2, (JAX_FOLDED,), 1, 0, compile_target_s=15))
        cases.append(Case("compile", v, "train", 64, 2, (JAX_TRAIN,), 1, 0, compile_target_s=45))
    return cases


DEFAULT_VARIANTS: dict[str, tuple[str, ...]] = {
    "official": ALL_VARIANTS,
    "threads2": ("efficientvit_m0", "efficientvit_m4"),
    "train": ("efficientvit_m0", "efficientvit_m4"),
    "compile": ("efficientvit_m5",),
}


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
    variants in whichever sections are chosen). Variants: ``m0`` or ``efficientvit_m0``."""
    chosen: dict[str, list[str]] = {}
    keep: set[str] = set()
    tokens = [t.strip() for item in items or [] for t in item.split(",") if t.strip()]
    for token in tokens:
        section, _, vs = token.partition(":")
        if section in SECTIONS:
            if vs:
                for v in vs.split("+"):
                    full = _variant(v)
                    if full is None:
                        raise ValueError(f"--only {token}: unknown variant {v!r}")
                    chosen.setdefault(section, []).append(full)
            else:
                chosen.setdefault(section, []).extend(DEFAULT_VARIANTS[section])
        elif (full := _variant(token)) is not None:
            keep.add(full)
        else:
            raise ValueError(f"--only {token}: not a section ({', '.join(SECTIONS)}) or variant")
    if not chosen:  # only bare variants (or nothing): every section
        chosen = {s: list(keep) if keep else list(DEFAULT_VARIANTS[s]) for s in SECTIONS}
    out = {}
    for section, vs in chosen.items():
        vs = [v for v in dict.fromkeys(vs) if not keep or v in keep]
        if vs:
            out[section] = tuple(vs)
    return out
