"""The benchmark's own pieces: the plan, the contestants' code paths, the worker protocol, the
report, and bench/device_check.sh (dry run and CPU mode)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from utils import assert_logits_close

from cga_jax.config import EfficientViTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is not installed; plain `pytest` does not add the root
    sys.path.insert(0, str(ROOT))

from bench import analyse, device_check, plan, plan_gpu, report, runner, worker  # noqa: E402
from bench.worker_api import Task  # noqa: E402

TINY = EfficientViTConfig(
    embed_dim=(16, 32, 48),
    key_dim=(8, 8, 8),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    kernels=(5, 3, 3, 3),
    img_size=64,
    num_classes=10,
)


def test_torch_replace_batchnorm_matches_unfused():
    torch_ref = pytest.importorskip("torch_ref")
    from bench.tasks_torch import fused_eval

    torch = torch_ref.torch
    tm = torch_ref.timm_from_config(TINY)
    torch_ref.randomize_(tm, seed=2)
    torch_ref.calibrate_bn_(tm, (64, 64), seed=2)
    x = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
    ref = torch_ref.run_nchw(tm, x)
    fused = fused_eval(tm)
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in fused.modules()
    )
    assert_logits_close(torch_ref.run_nchw(fused, x), ref, "timm fused logits")


def test_parse_only():
    assert plan.parse_only(None) == plan.DEFAULT_VARIANTS
    assert "gpu" not in plan.DEFAULT_VARIANTS  # the accelerator section only when asked for
    assert plan.parse_only(["official:m1+m2"]) == {
        "official": ("efficientvit_m1", "efficientvit_m2")
    }
    assert plan.parse_only(["train,m0"]) == {"train": ("efficientvit_m0",)}
    assert set(plan.parse_only(["m4"])) == set(plan.DEFAULT_VARIANTS)
    assert plan.parse_only(["gpu"]) == {"gpu": plan_gpu.VARIANTS}
    assert plan.parse_only(["gpu,m0"]) == {"gpu": ("efficientvit_m0",)}
    with pytest.raises(ValueError, match="m9"):
        plan.parse_only(["m9"])
    with pytest.raises(ValueError, match="not a section"):
        plan.parse_only(["gpus"])


def test_build_plan_accepts_the_old_iters_scale_argument():
    (case,) = plan.build_plan({"official": ("efficientvit_m0",)}, 0.1)
    assert case.iters == 3 and case.ratio_targets == ((plan.JAX, "PyTorch traced", 1.3),)


def test_gpu_plan():
    """The official GPU protocol for every variant, the bf16 training step for M0 and M4, the
    issue's targets, and the batch options."""
    cases = plan.build_plan(plan.parse_only(["gpu"]), {"repeat_s": 0.5})
    infer = [c for c in cases if c.task == "infer"]
    train = [c for c in cases if c.task == "train"]
    assert sorted(c.variant for c in infer) == list(plan.ALL_VARIANTS)
    assert [c.variant for c in train] == ["efficientvit_m0", "efficientvit_m4"]
    assert cases[0].variant == cases[1].variant == "efficientvit_m0"  # targets' models first
    for c in cases:
        assert c.device == "gpu" and c.repeat_s == 0.5
    c0 = infer[0]
    assert c0.batch == 2048 and train[0].batch == 256
    labels = {(x.label, x.kind, x.mode, x.dtype) for x in c0.contestants}
    assert labels == {
        ("cga_jax fp32", "cga_jax", "folded", "float32"),
        ("cga_jax bf16", "cga_jax", "folded", "bfloat16"),
        ("PyTorch fp32", "torch", "traced", "float32"),
        ("PyTorch AMP bf16", "torch", "traced", "bfloat16"),
        ("PyTorch AMP fp16", "torch", "traced", "float16"),
    }
    assert ("cga_jax bf16", "PyTorch AMP fp16", 1.2) in c0.ratio_targets
    assert ("cga_jax bf16", "PyTorch AMP bf16", 1.2) in c0.ratio_targets
    assert c0.abs_targets[0][:2] == ("cga_jax bf16", 3 * 27644)
    assert all(not c.abs_targets for c in infer[1:])  # the paper's figure is M0's
    assert train[0].ratio_targets == (("cga_jax bf16", "PyTorch AMP bf16", 1.2),)
    small = plan.build_plan({"gpu": ("efficientvit_m4",)}, {"gpu_batch": 8, "gpu_train_batch": 4})
    assert [c.batch for c in small] == [8, 4]
    compiled = plan.build_plan({"gpu": ("efficientvit_m1",)}, {"gpu_torch_compile": True})
    assert "PyTorch compiled AMP bf16" in {x.label for x in compiled[0].contestants}


def test_threads2_runs_cga_jax_sharded_and_on_one_device():
    (case,) = plan.build_plan({"threads2": ("efficientvit_m0",)})
    jax_runs = {(c.label, c.mode, c.devices(case.threads)) for c in case.contestants}
    assert {(plan.JAX, "sharded", 2), ("cga_jax 1 device", "folded", 1)} <= jax_runs
    assert {label for _, label, _ in case.ratio_targets} == {"PyTorch eager", "ONNX Runtime"}
    flag = "--xla_force_host_platform_device_count=2"
    assert flag in runner.worker_env("cga_jax", 2, devices=2)["XLA_FLAGS"]
    assert flag not in runner.worker_env("cga_jax", 2).get("XLA_FLAGS", "")
    assert "2 host devices" in runner.thread_settings("cga_jax", 2, devices=2)


def test_accelerator_worker_environment(monkeypatch):
    """One GPU, JAX on CUDA without preallocation and with a memory cap (the torch process runs
    beside it), no thread pinning; the CPU check mode hides CUDA."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    env = runner.accel_env("cuda")
    assert env["JAX_PLATFORMS"] == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 0.5
    assert "OMP_NUM_THREADS" not in env or env["OMP_NUM_THREADS"] == os.environ.get(
        "OMP_NUM_THREADS"
    )
    cpu = runner.accel_env("cpu")
    assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""


def test_tasks_jax_is_the_readme_path():
    """The benchmark's cga_jax inference is the README quickstart, statement for statement, with
    no compiler options or private helpers."""
    src = (ROOT / "bench" / "tasks_jax.py").read_text()
    code = re.sub(r'""".*?"""', "", src, flags=re.S)  # docstrings say what the code must do
    readme_lines = [
        "cga_jax.apply_cpu_flags()",
        'cga_jax.create_model(spec["variant"], pretrained=spec["weights"])',
        "model.eval()",
        "model = cga_jax.fuse_bn(model)",
        "graphdef, state = nnx.split(model)",
        "forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))",
        "forward(state, x)",
    ]
    for line in readme_lines:
        assert line in code, line
    assert "compiler_options" not in code and "xla_options" not in code
    assert not re.search(r"cga_jax\.\w*\._", code), "a private cga_jax helper"
    readme = (ROOT / "README.md").read_text()
    if "fuse_bn(model)" not in readme or "jax.jit(lambda state, x" not in readme:
        pytest.skip("README.md does not show the jit inference quickstart yet")
    for line in readme_lines[:1] + readme_lines[2:6]:
        assert line in readme, f"README quickstart lacks {line!r}"


_MODES_CHECK = """
import json, sys
import numpy as np
from bench.tasks_jax import build_infer
spec = {"variant": "efficientvit_m0", "weights": sys.argv[1], "task": "infer", "batch": 4}
out = {}
for mode, dtype in (("sharded", "float32"), ("folded", "float32"), ("unfolded", "float32"),
                    ("folded", "bfloat16")):
    task = build_infer({**spec, "mode": mode, "dtype": dtype})
    out[f"{mode} {dtype}"] = (np.asarray(task.step(), np.float32).tolist(), task.info)
print(json.dumps(out))
"""


def test_jax_inference_modes_agree(tmp_path):
    """The benchmark's cga_jax forwards on M0 with the benchmark's weights: folded by
    cga_jax.fuse_bn = unfolded; the batch sharded over 2 host devices = one device; bf16 near
    fp32 (reduced precision only: PyTorch AMP bf16 is 0.10 from its fp32 here)."""
    pytest.importorskip("timm")
    from bench.prepare import save_weights  # random timm weights, calibrated BN statistics

    weights = tmp_path / "m0.npz"
    save_weights("efficientvit_m0", weights)
    env = runner.worker_env("cga_jax", 2, devices=2)
    out = subprocess.run(
        [sys.executable, "-c", _MODES_CHECK, str(weights)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    folded, info = res["folded float32"]
    assert info["fold"] == "cga_jax.fuse_bn" and res["unfolded float32"][1]["fold"] == "none"
    assert np.asarray(folded).shape == (4, 1000) and np.abs(folded).max() > 0.1
    assert_logits_close(folded, res["unfolded float32"][0], "folded vs unfolded logits")
    sharded, info = res["sharded float32"]
    assert info["devices"] == 2 and res["folded float32"][1]["devices"] == 1
    assert_logits_close(sharded, folded, "sharded vs one-device logits")
    bf16, info = res["folded bfloat16"]
    assert info["dtype"] == "bfloat16"
    err = np.abs(np.asarray(bf16) - folded).max() / max(1.0, np.abs(folded).max())
    assert 0 < err < 0.2, err  # bf16 rounding: not identical, not wrong (0.078 measured)


class _OomAbove:
    """A task module whose first call runs out of memory above ``limit`` images."""

    def __init__(self, limit: int):
        self.limit = limit
        self.released = 0

    def build(self, spec):
        def step():
            if spec["batch"] > self.limit:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
            return np.zeros((spec["batch"], 3), np.float32)

        return Task(step=step, images_per_step=spec["batch"])

    @staticmethod
    def is_oom(exc):
        return "RESOURCE_EXHAUSTED" in str(exc)

    def release(self):
        self.released += 1


def test_build_probing_halves_the_batch_on_oom():
    module = _OomAbove(300)
    task, out, t = worker.build_probing(module, {"batch": 2048, "probe_oom": True})
    assert t["batch"] == 256 and t["oom_batches"] == [2048, 1024, 512]
    assert task.images_per_step == 256 and out.shape == (256, 3) and module.released == 3
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # no probing on CPU cases
        worker.build_probing(_OomAbove(300), {"batch": 2048, "probe_oom": False})
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # not even one image fits
        worker.build_probing(_OomAbove(0), {"batch": 4, "probe_oom": True})
    bad = types.SimpleNamespace(build=_OomAbove(300).build, is_oom=lambda e: False, release=None)
    with pytest.raises(RuntimeError):  # another error is not retried
        worker.build_probing(bad, {"batch": 2048, "probe_oom": True})


def _gpu_result(tmp_path, case, rates, logits, batches=None):
    cs = []
    for x in case.contestants:
        path = tmp_path / f"{x.label}.npy"
        np.save(path, logits[x.label])
        out = {"loss0": float(logits[x.label])} if case.task == "train" else {"logits": str(path)}
        cs.append({"label": x.label, "kind": x.kind, "mode": x.mode, "dtype": x.dtype,
                   "median_img_s": rates[x.label], "spread": 0.01, "img_s": [rates[x.label]],
                   **out, "batch": (batches or {}).get(x.label, case.batch),
                   "build_s": 1.0, "first_call_s": 2.0, "step_s": 0.01, "maxrss_mib": 900.0,
                   "rss_after_import_mib": 300.0, "device_peak_bytes_in_use_mib": 500.0})  # fmt: skip
    return analyse.evaluate(case, {"case": case.name, "contestants": cs})


def test_gpu_analysis_and_report(tmp_path):
    """Ratios per target pair, the absolute M0 target, agreement with the cga_jax contestant of
    the same precision, bf16 error vs the own fp32, and a report with the GPU tables."""
    infer, train = plan.build_plan({"gpu": ("efficientvit_m0",)})
    rng = np.random.RandomState(0)
    ref = rng.randn(4, 1000) * 5
    logits = {
        "cga_jax fp32": ref,
        "PyTorch fp32": ref + 1e-5,
        "cga_jax bf16": ref + 0.02,
        "PyTorch AMP bf16": ref - 0.03,
        "PyTorch AMP fp16": ref + 0.01,
    }
    rates = {"cga_jax fp32": 50e3, "cga_jax bf16": 90e3, "PyTorch fp32": 40e3,
             "PyTorch AMP bf16": 80e3, "PyTorch AMP fp16": 70e3}  # fmt: skip
    r = _gpu_result(tmp_path, infer, rates, logits, batches={"PyTorch fp32": 1024})
    q = r["ratios"]
    assert q["cga_jax bf16 vs PyTorch AMP fp16"]["ratio"] == pytest.approx(90 / 70)
    assert q["cga_jax bf16 vs PyTorch AMP fp16"]["met"] is True
    assert q["cga_jax bf16 vs PyTorch AMP bf16"]["met"] is False  # 1.125 < 1.2
    assert q["cga_jax fp32 vs PyTorch fp32"]["met"] is None  # reported, no target
    (a,) = r["absolute"]
    assert a["img_s"] == 90e3 and a["met"] is True  # 90k >= 3 x 27,644

    def rel(a, b):
        return np.abs(logits[a] - logits[b]).max() / max(1.0, np.abs(logits[b]).max())

    assert r["agreement"]["PyTorch fp32"] == pytest.approx(rel("cga_jax fp32", "PyTorch fp32"))
    bf16 = rel("cga_jax bf16", "PyTorch AMP bf16")  # vs cga_jax bf16, not fp32
    assert bf16 > 0.04 / np.abs(ref).max() and r["agreement"]["PyTorch AMP bf16"] == bf16
    assert r["precision"]["cga_jax bf16"] == pytest.approx(rel("cga_jax bf16", "cga_jax fp32"))
    assert r["precision"]["PyTorch AMP fp16"] == pytest.approx(
        rel("PyTorch AMP fp16", "PyTorch fp32")
    )
    t = {"cga_jax bf16": 900.0, "PyTorch AMP bf16": 600.0}
    rt = _gpu_result(tmp_path, train, t, {"cga_jax bf16": 6.9, "PyTorch AMP bf16": 6.8})
    assert rt["ratios"]["cga_jax bf16 vs PyTorch AMP bf16"]["ratio"] == pytest.approx(1.5)
    assert rt["agreement"]["PyTorch AMP bf16"] == pytest.approx(0.1 / 6.8)
    skipped = analyse.evaluate(infer, {"case": "x", "skipped": "time budget"})
    desc = {"time_utc": "now", "cpu": {"model": "test"}, "logical_cpus": 2, "cpus_allowed": [0],
            "mem_gib": 1, "os": "x", "python": "3", "versions": {}, "gpus": [
                {"name": "NVIDIA H200", "memory.total": "143771 MiB", "driver_version": "570",
                 "cuda_driver_api": "12.8"}]}  # fmt: skip
    run = {"machine": desc, "results": [r, rt, skipped], "thread_settings": {},
           "options": {"quick": False, "repeats": 3, "warmup": 2, "gpu_platform": "cuda"},
           "accelerator": {"torch": {"platform": {"torch": "2.11", "device": "NVIDIA H200",
                                                   "cuda": "12.8", "cudnn": 91000}}}}  # fmt: skip
    paths = report.write(run, tmp_path, "gpu")
    md = paths["md"].read_text()
    assert md.startswith("# cga_jax benchmark: GPU (")
    assert "GPU 0: NVIDIA H200, 143771 MiB, driver 570 (CUDA 12.8)" in md
    assert "### inference, throughput" in md and "### training step, bf16" in md
    assert "| m0 | 2048 | 50,000.0 ±1% | 90,000.0 ±1% | 40,000.0 ±1% (b1024) |" in md
    assert "1.29× ✓" in md and "1.12× ✗" in md and "skipped: time budget" in md
    assert "NOT a GPU measurement" not in md
    assert json.loads(paths["json"].read_text())["results"][0]["ratios"]
    assert paths["png"].stat().st_size > 0


def test_select_wheels(tmp_path):
    """Only wheels of distributions the machine lacks are installed (a carried copy of an
    installed package would shadow the machine's own)."""
    for name in ("pytest-9.2.0-py3-none-any.whl", "surely_absent_pkg_xyz-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [w.name for w in device_check.select_wheels(tmp_path)] == [
        "surely_absent_pkg_xyz-1.0-py3-none-any.whl"
    ]
    assert device_check.wheel_distribution("pytest_xdist-3.8.0-py3-none-any.whl") == "pytest-xdist"
    listed = {device_check._canon(r.split("==")[0]) for r in device_check.listed_wheels()}
    # what the device machine lacks and device_check imports is carried
    assert {"ml-collections", "pytest", "matplotlib", "pytest-xdist"} <= listed
    assert all("==" in r for r in device_check.listed_wheels())  # pinned


def _device_check(tmp_path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_device_check_dry_run(tmp_path):
    out = _device_check(tmp_path, "--dry-run", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "python -m bench.run --only gpu --repeats 3" in out.stdout
    assert "tests/test_parity_timm.py tests/test_official_fixtures.py" in out.stdout
    assert "ml-collections==1.1.0" in out.stdout and "MISSING" not in out.stdout


def _check_cpu_report(tmp_path) -> str:
    md = (tmp_path / "device_check_cpu.md").read_text()
    assert (tmp_path / "device_check_cpu.json").exists()
    assert (tmp_path / "device_check_cpu.png").exists()
    assert md.startswith("# cga_jax benchmark: GPU section run on the CPU")
    for table in ("inference, throughput", "training step, bf16", "first calls and step times"):
        assert f"### {table} - run on the CPU (a check of the code path, NOT a GPU" in md
    summary = json.loads((tmp_path / "device_check_cpu_summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["environment"]["probe"]["jax_devices"]
    assert summary["parity"]["ok"], summary["parity"]
    assert (tmp_path / "parity.log").exists() and (tmp_path / "env.txt").exists()
    return md


@pytest.mark.slow  # ~2 min: a whole device_check.sh run on the CPU
def test_device_check_cpu_mode_small_budget(tmp_path):
    """``device_check.sh --cpu`` under a small budget: every step runs, and the report has the
    GPU section's tables, CPU-labelled, with M0's rows measured or skipped for the budget."""
    out = _device_check(tmp_path, "--cpu", "--budget-s", "150", timeout=280)
    assert out.returncode in (0, 1), out.stdout[-3000:] + out.stderr[-3000:]
    md = _check_cpu_report(tmp_path)
    rows = [ln for ln in md.splitlines() if ln.startswith("| m0 | ")]
    assert len(rows) >= 2, md
    for row in rows[:2]:  # the inference and training tables
        assert "error" not in row, row
    results = json.loads((tmp_path / "device_check_cpu.json").read_text())["results"]
    assert {r["task"] for r in results} == {"infer", "train"}
    assert all("error" not in r for r in results), [r.get("error") for r in results]


@pytest.mark.slow
def test_device_check_cpu_mode_complete(tmp_path):
    """The whole CPU mode with a budget a busy 2-core machine needs: both M0 cases measured, cga_jax fp32 logits
    within the parity bar of PyTorch's, the bf16 step's loss close to PyTorch AMP's."""
    out = _device_check(tmp_path, "--cpu", "--budget-s", "1500", timeout=1600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check_cpu_report(tmp_path)
    results = json.loads((tmp_path / "device_check_cpu.json").read_text())["results"]
    infer = next(r for r in results if r["task"] == "infer")
    train = next(r for r in results if r["task"] == "train")
    assert all(c["median_img_s"] > 0 for r in (infer, train) for c in r["contestants"])
    assert infer["agreement"]["PyTorch fp32"] <= 1e-4
    assert infer["precision"]["cga_jax bf16"] < 0.1
    assert train["agreement"]["PyTorch AMP bf16"] < 0.05
