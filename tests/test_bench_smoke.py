"""The benchmark's own pieces: BN folding (cga_jax and timm side) and the --only parser."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from utils import assert_logits_close

import cga_jax
from cga_jax.config import EfficientViTConfig
from cga_jax.layers import BatchNorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is not installed; plain `pytest` does not add the root
    sys.path.insert(0, str(ROOT))

from bench import plan, runner  # noqa: E402
from bench.fold import fold_batchnorm, get_folder  # noqa: E402

TINY = EfficientViTConfig(
    embed_dim=(16, 32, 48),
    key_dim=(8, 8, 8),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    kernels=(5, 3, 3, 3),
    img_size=64,
    num_classes=10,
)


def _random_tiny(seed: int = 0, cfg: EfficientViTConfig = TINY) -> nnx.Module:
    """``cfg`` (default TINY) with random weights, BN affines/statistics and attention biases (the default init
    folds to near no-ops). Built abstractly and filled from numpy: eager init compiles one
    kernel per parameter shape, which takes far longer than the test itself."""
    abstract = nnx.eval_shape(lambda: cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    rng = np.random.RandomState(seed)
    fill = {
        "bias": lambda shape: rng.normal(0, 0.1, shape),
        "scale": lambda shape: rng.uniform(0.5, 1.5, shape),
        "mean": lambda shape: rng.normal(0, 0.3, shape),
        "var": lambda shape: rng.uniform(0.5, 2.0, shape),
        "attention_biases": lambda shape: rng.normal(0, 0.5, shape),
    }
    for path, leaf in flat.items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":  # (..., fan_in, out)
            value = rng.normal(0, 1, shape) * (int(np.prod(shape[:-1])) ** -0.5)
        else:
            value = fill[name](shape)
        flat[path] = jnp.asarray(value, jnp.float32)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, state)


def _forward(model: nnx.Module, x: jax.Array) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))


def test_fold_batchnorm_matches_unfused():
    model = _random_tiny()
    model.eval()
    x = jnp.asarray(np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32))
    ref = _forward(model, x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(folded))
    assert any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(model))  # original kept
    assert np.abs(ref).max() > 0.1  # the check is not vacuous
    assert_logits_close(_forward(folded, x), ref, "folded logits")


def test_get_folder_choices():
    name, fn = get_folder("bench")
    assert fn is fold_batchnorm and name.startswith("bench.")
    auto_name, _ = get_folder("auto")
    assert auto_name == ("cga_jax.fuse_bn" if hasattr(cga_jax, "fuse_bn") else name)
    if not hasattr(cga_jax, "fuse_bn"):
        with pytest.raises(RuntimeError):
            get_folder("cga_jax")
    with pytest.raises(ValueError):
        get_folder("nope")


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
    assert plan.parse_only(["official:m1+m2"]) == {
        "official": ("efficientvit_m1", "efficientvit_m2")
    }
    assert plan.parse_only(["train,m0"]) == {"train": ("efficientvit_m0",)}
    assert set(plan.parse_only(["m4"])) == set(plan.SECTIONS)
    with pytest.raises(ValueError):
        plan.parse_only(["m9"])


def test_threads2_runs_cga_jax_sharded_and_on_one_device():
    (case,) = plan.build_plan({"threads2": ("efficientvit_m0",)})
    jax_runs = {(c.label, c.mode, c.devices(case.threads)) for c in case.contestants}
    assert {(plan.JAX, "sharded", 2), ("cga_jax 1 device", "folded", 1)} <= jax_runs
    assert {label for label, _ in case.targets} == {"PyTorch eager", "ONNX Runtime"}
    flag = "--xla_force_host_platform_device_count=2"
    assert flag in runner.worker_env("cga_jax", 2, devices=2)["XLA_FLAGS"]
    assert flag not in runner.worker_env("cga_jax", 2).get("XLA_FLAGS", "")
    assert "2 host devices" in runner.thread_settings("cga_jax", 2, devices=2)


_SHARDED_CHECK = """
import json, sys
import numpy as np
from bench.tasks_jax import build_infer
spec = {"variant": "efficientvit_m0", "weights": sys.argv[1], "task": "infer", "batch": 4}
out = {}
for mode in ("sharded", "folded"):
    task = build_infer({**spec, "mode": mode})
    out[mode] = (np.asarray(task.step()).tolist(), task.info["devices"])
print(json.dumps(out))
"""


def test_sharded_forward_equals_one_device(tmp_path):
    """The threads2 contestant: the folded M0 over 2 host devices, batch sharded, gives the
    single-device logits."""
    from cga_jax.config import VARIANTS
    from cga_jax.keymap import to_timm_state_dict

    weights = tmp_path / "m0.npz"
    np.savez(weights, **to_timm_state_dict(_random_tiny(1, VARIANTS["efficientvit_m0"])))
    env = runner.worker_env("cga_jax", 2, devices=2)
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHECK, str(weights)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    (sharded, n_sharded), (one, n_one) = res["sharded"], res["folded"]
    assert (n_sharded, n_one) == (2, 1)
    assert np.asarray(one).shape == (4, 1000)
    assert_logits_close(np.asarray(sharded), np.asarray(one), "sharded vs one-device logits")
