"""``python -m bench.run --only input``: training input pipelines, images per second per core.

The official train transform (random-resized-crop 224 bicubic, flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 'pixel') on the same generated ImageNet-sized
JPEGs (:mod:`bench.input_data`) and on ArrayRecord shards of them, for timm's DataLoader and
cga_jax's Grain loader in its modes. Per core: each contestant in its own process pinned to one
CPU with no loader workers, timed alternately (A B C ... A B C ...), each process kept for all
repeats. All cores: as many loader worker processes as CPUs; every repeat starts a fresh
process (loader workers prefetch in the background, which would steal CPU from the other
contestants' repeats), warms up one batch and times one pass. Device side: the jitted flip +
RandAugment + normalise + erasing of a 64-image batch on one CPU core (the cost the train step
takes over), and the same with the resample of the crop boxes (``data.device_resize``). Results: ``bench/results/input.{md,png,json}``.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import machine
from bench.input_data import make_folder
from bench.runner import REPO, worker_env

RA = "rand-m9-mstd0.5-inc1"
BATCH = 64
TIMEOUT_S = 900.0
HOST_AUG = dict(randaugment=RA, reprob=0.25, workers=0)
RESIZE_LABEL = "cga_jax fast + device aug + device resize"
DECODE_LABEL = "JPEG decode alone at the box's DCT scale (ceiling, not a pipeline)"


def contestants(jpg: str, shards: str, small: str, cores: int) -> list[dict[str, Any]]:
    """(label, kind, root, data keys, cpus): the per-core set, then the all-cores set."""
    one = [sorted(os.sched_getaffinity(0))[0]]
    modes = [
        ("cga_jax exact", dict(decode="exact")),
        ("cga_jax fast", dict(decode="fast")),
        ("cga_jax fast + device aug", dict(decode="fast", device_aug=True)),
        (RESIZE_LABEL, dict(decode="fast", device_aug=True, device_resize=True)),
    ]
    out: list[dict[str, Any]] = [dict(label="timm DataLoader", kind="timm", root=jpg, data={})]
    out += [dict(label=lbl, kind="cga_jax", root=jpg, data=d) for lbl, d in modes]
    dev = dict(decode="fast", device_aug=True)
    out.append(
        dict(label="cga_jax fast + device aug, shards", kind="cga_jax", root=shards, data=dev)
    )
    out.append(
        dict(
            label="cga_jax fast + device aug, shards --resize-short 320",
            kind="cga_jax",
            root=small,
            data=dev,
        )
    )
    out.append(dict(label=DECODE_LABEL, kind="decode", root=jpg, data={}))
    for c in out:
        c.update(cores=1, cpus=one, workers=0)
    allc = [dict(label="timm DataLoader", kind="timm", root=jpg, data={})]
    allc += [dict(label=lbl, kind="cga_jax", root=jpg, data=d) for lbl, d in modes]
    for c in allc:
        c.update(cores=cores, cpus=None, workers=cores)
    return out + allc


class Proc:
    def __init__(self, spec: dict[str, Any], log: pathlib.Path):
        self.spec, self._log = spec, open(log, "a")
        env = worker_env("cga_jax" if spec["kind"] != "timm" else "torch", spec["cores"])
        self.p = subprocess.Popen(
            [sys.executable, "-m", "bench.input_worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=REPO,
            text=True,
        )
        self._recv()

    def _recv(self) -> dict[str, Any]:
        if not select.select([self.p.stdout], [], [], TIMEOUT_S)[0]:
            self.p.kill()
            raise RuntimeError(f"{self.spec['label']}: no reply in {TIMEOUT_S:.0f}s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.spec['label']} died (rc {self.p.wait()})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.spec['label']} failed:\n{msg['error']}")
        return msg

    def run(self) -> float:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        m = self._recv()
        return m["images"] / m["seconds"]

    def stop(self) -> None:
        try:
            self.p.stdin.write("stop\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
        self._log.close()


def _spec(c: dict[str, Any], images: int) -> dict[str, Any]:
    data = {**HOST_AUG, **c["data"], "workers": c["workers"]}
    return {**c, "data": data, "batch": BATCH, "images": images}


def measure(tmp: pathlib.Path, repeats: int, quick: bool) -> dict[str, Any]:
    from cga_jax.training.arrayrecord import pack

    n = 128 if quick else 512
    jpg, nbytes, npix = make_folder(tmp / "jpg" / "train", n)
    pack(jpg, tmp / "shards" / "train", 4, log=lambda *_: None)
    pack(jpg, tmp / "small" / "train", 4, resize_short=320, log=lambda *_: None)
    cores = len(os.sched_getaffinity(0))
    cs = contestants(str(tmp / "jpg"), str(tmp / "shards"), str(tmp / "small"), cores)
    images = BATCH * (2 if quick else 6)
    log = tmp / "workers.log"
    rates: dict[int, list[float]] = {i: [] for i in range(len(cs))}
    per_core = [i for i, c in enumerate(cs) if c["cores"] == 1]
    procs = {i: Proc(_spec(cs[i], images), log) for i in per_core}
    try:
        for _ in range(repeats):
            for i in per_core:
                rates[i].append(procs[i].run())
    finally:
        for p in procs.values():
            p.stop()
    for _ in range(repeats):
        for i, c in enumerate(cs):
            if c["cores"] > 1:
                p = Proc(_spec(c, images * 2), log)
                try:
                    rates[i].append(p.run())
                finally:
                    p.stop()
    dev_rates = {}
    for key, extra in (("device", {}), ("device_resize", dict(device_resize=True))):
        dev = dict(
            label=f"device side ({key})",
            kind="device",
            root=str(tmp / "jpg"),
            data=dict(decode="fast", device_aug=True, **extra),
            cores=1,
            cpus=[sorted(os.sched_getaffinity(0))[0]],
            workers=0,
            iters=1 if quick else 3,
        )
        p = Proc(_spec(dev, 0), log)
        try:
            dev_rates[key] = [p.run() for _ in range(repeats)]
        finally:
            p.stop()
    p = Proc(dict(label="fidelity", kind="fidelity", root=str(tmp / "jpg"), cores=1), log)
    try:
        p.p.stdin.write("run\n")
        p.p.stdin.flush()
        fid = p._recv()["fidelity"]
    finally:
        p.stop()
    results = []
    for i, c in enumerate(cs):
        r = rates[i]
        med = statistics.median(r)
        results.append(
            dict(
                label=c["label"],
                cores=c["cores"],
                img_s=med,
                per_core=med / c["cores"],
                spread=(max(r) - min(r)) / 2 / med,
                repeats=r,
            )
        )
    dev_out = {}
    for key, rs in dev_rates.items():
        dmed = statistics.median(rs)
        dev_out[key] = dict(img_s=dmed, ms_per_image=1000 / dmed, repeats=rs)
    return dict(
        images=n,
        mean_kib=nbytes / n / 1024,
        mean_pixels=npix / n,
        bits_per_pixel=8 * nbytes / npix,
        results=results,
        device=dev_out["device"],
        device_resize=dev_out["device_resize"],
        fidelity=fid,
    )


TARGETS = (
    ("cga_jax fast + device aug", 5.0, "≥"),
    (RESIZE_LABEL, 5.0, "≥"),
    ("cga_jax fast", 3.0, "≥"),
    ("cga_jax exact", 0.9, "≥"),
)


def markdown(run: dict[str, Any]) -> str:
    m, r = run["machine"], run["input"]
    dz = r["fidelity"]["device_resize"]
    out = [f"# cga_jax input-pipeline benchmark ({m['time_utc']} UTC)", ""]
    if run["quick"]:
        out += ["**Quick smoke run: too few repeats to be a measurement.**", ""]
    out += ["## Machine", "", *machine.summary_lines(m), ""]
    out += [
        "## Protocol",
        "",
        f"- {r['images']} generated JPEGs (`bench/input_data.py`: 375-640 px per side, quality "
        f"90, mean {r['mean_pixels'] / 1000:.0f} kpx, {r['mean_kib']:.0f} KiB, "
        f"{r['bits_per_pixel']:.2f} bits/px) in an ImageNet-style folder; the same files packed "
        "into 4 ArrayRecord shards (bytes as they are), and once more with "
        "`--resize-short 320` (re-encoded: a smaller input, not the same workload).",
        "- transform: random-resized-crop 224 bicubic, flip 0.5, RandAugment "
        f"`{RA}`, random erasing 0.25 (timm: `create_transform(..., re_mode='pixel')`, "
        "ToTensor + Normalize on the host; cga_jax ships uint8 and normalises on the device), "
        f"batch {BATCH}, shuffled.",
        "- per core: one process pinned to one CPU, no loader workers, contestants timed "
        f"alternately, {run['repeats']} repeats; all cores: loader workers = CPUs, a fresh "
        "process per repeat. img/s = median over repeats (± half the range).",
        "",
        "## Results",
        "",
        "| pipeline | cores | img/s | img/s per core | vs timm (same cores) |",
        "|---|---|---|---|---|",
    ]
    base = {x["cores"]: x["img_s"] for x in r["results"] if x["label"] == "timm DataLoader"}
    for x in r["results"]:
        ratio = x["img_s"] / base[x["cores"]] if x["cores"] in base else float("nan")
        out.append(
            f"| {x['label']} | {x['cores']} | {x['img_s']:.0f} ±{100 * x['spread']:.0f}% | "
            f"{x['per_core']:.0f} | {ratio:.2f}× |"
        )
    d = r["device"]
    out += [
        "",
        f"Device side, on this CPU (1 core, jitted, batch {BATCH}): flip + RandAugment + "
        f"normalise + erasing {d['ms_per_image']:.2f} ms per image ({d['img_s']:.0f} img/s); "
        f"with the resample of the crop boxes (device resize) "
        f"{r['device_resize']['ms_per_image']:.2f} ms per image "
        f"({r['device_resize']['img_s']:.0f} img/s).",
        "",
        "## Fidelity",
        "",
        f"- fast vs exact, same boxes ({r['fidelity']['n']} images, seeds 0..n-1): "
        f"{100 * r['fidelity']['scaled_share']:.0f}% of the boxes are decoded at a reduced DCT "
        "scale (the others are decoded and resampled exactly as exact: identical pixels); mean "
        f"abs diff {r['fidelity']['mad_all']:.3f} levels over all crops, "
        f"{r['fidelity']['mad_scaled']:.2f} over the reduced ones, PSNR of those median "
        f"{r['fidelity']['psnr_scaled_median'] or float('nan'):.1f} dB, "
        f"min {r['fidelity']['psnr_scaled_min'] or float('nan'):.1f} dB.",
        f"- device resize ({dz['n']} images): canvas {dz['canvas'][0]}x{dz['canvas'][1]} uint8, "
        f"{dz['bytes_per_image'] / 1024:.0f} KiB per image to the device (224x224x3: 147 KiB); "
        f"vs Pillow's bicubic resize of the same box at the same DCT scale: mean abs diff "
        f"{dz['mad_vs_pil_same_scale']:.3f} levels ({dz['mad_vs_pil_upright']:.4f} on boxes "
        f"stored upright, {dz['mad_vs_pil_transposed']:.3f} on the "
        f"{100 * dz['transposed_share']:.0f}% stored transposed, worst image "
        f"{dz['max_image_mad_vs_pil']:.3f}); vs exact (full decode): "
        f"{dz['mad_vs_exact']:.3f}.",
        "- device RandAugment op vs PIL (16 exact 224 px crops, magnitudes 0-10 both signs, "
        "bicubic; worst mean abs diff over magnitudes, 0-255): "
        + ", ".join(f"{k} {v:.4f}" for k, v in r["fidelity"]["device_ops_worst_mad"].items())
        + ".",
        "",
        "## Targets (per core, same run)",
        "",
        "| pipeline | target vs timm | measured | met |",
        "|---|---|---|---|",
    ]
    for label, target, op in TARGETS:
        got = next((x for x in r["results"] if x["label"] == label and x["cores"] == 1), None)
        if got and 1 in base:
            q = got["img_s"] / base[1]
            out.append(f"| {label} | {op} {target:g}× | {q:.2f}× | {'✓' if q >= target else '✗'} |")
    ceil = next((x for x in r["results"] if x["label"] == DECODE_LABEL), None)
    if ceil and 1 in base:
        out += [
            "",
            f"Ceiling: the JPEG decode alone (Pillow/libjpeg at the box's DCT scale, nothing "
            f"else) runs at {ceil['img_s']:.0f} img/s per core, {ceil['img_s'] / base[1]:.2f}× "
            "timm: no pipeline that decodes these files with Pillow on the host can go faster.",
        ]
    return "\n".join(out) + "\n"


def chart(run: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = run["input"]["results"]
    names = [f"{x['label']} ({x['cores']} core{'s' if x['cores'] > 1 else ''})" for x in res][::-1]
    vals = [x["per_core"] for x in res][::-1]
    colors = ["tab:gray" if "timm" in n else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.barh(names, vals, color=colors)
    for name, v in zip(names, vals, strict=True):
        ax.annotate(f" {v:.0f}", (v, name), va="center", fontsize=8)
    ax.set_xlabel("images / s per core (official train transform, 224 px)")
    title = f"Input pipelines - {run['machine']['cpu'].get('model', '?')}"
    ax.set_title(title + (" (QUICK SMOKE RUN)" if run["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: pathlib.Path, repeats: int, quick: bool, name: str = "input") -> dict:
    desc = machine.describe()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="cga_bench_input_"))
    t0 = time.perf_counter()
    try:
        res = measure(tmp, repeats, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    desc["load_average_end"] = machine.load_average()
    run = dict(machine=desc, quick=quick, repeats=repeats, total_s=time.perf_counter() - t0)
    run["input"] = res
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(run, indent=1, default=str))
    paths["md"].write_text(markdown(run))
    chart(run, paths["png"])
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return run
