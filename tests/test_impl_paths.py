"""The two implementations of the primitives compute the same function: the standard lax path
(what GPUs and TPUs run) and the XLA-CPU kernels, on the same random BN-calibrated weights -
logits, gradients w.r.t. input and parameters, BN running statistics; eval and train mode; M0
and a mixed-kernel variant (M4).

In float64 the two paths agree to rounding. In float32 the input gradient of a random network is
ill-conditioned (both paths measured ~2% from float64, independently), so the float32 assertion is
that the CPU kernels are no less accurate than the standard path, against float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plugin_helpers import calibrate_bn, randomize_nnx

import cga_jax

BATCH, SIDE = 8, 160  # 160: stage maps 10, 5, 3 - padded windows in stage 1
SLOW = pytest.mark.slow
CASES = [
    ("efficientvit_m0", "train"),
    pytest.param("efficientvit_m0", "eval", marks=SLOW),
    pytest.param("efficientvit_m4", "train", marks=SLOW),
    pytest.param("efficientvit_m4", "eval", marks=SLOW),
]


def _run(model, x, r) -> dict:
    """Logits, d/d input and d/d params of sum(logits * r), BN statistics after the pass."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(x, params):
        def loss(x, p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            out = m(x)
            return jnp.sum(out * r), (out, nnx.state(m, nnx.BatchStat))

        (_, (out, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return out, grads, stats

    out, (gx, gp), stats = f(x, params)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(t))}  # noqa: E731,E501  # fmt: skip
    return (
        {"logits": np.asarray(out, np.float64), "d/d input": np.asarray(gx, np.float64)}
        | {f"d/d {k}": v for k, v in flat(gp).items()}
        | {f"stat {k}": v for k, v in flat(stats).items()}
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("name,mode", CASES)
def test_standard_and_cpu_paths_are_the_same_function(name, mode):
    rng = np.random.default_rng(5)
    model = nnx.eval_shape(lambda: cga_jax.create_model(name, impl="cpu"))
    randomize_nnx(model, seed=11)
    calibrate_bn(model, jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, 3)), jnp.float32))
    model.eval() if mode == "eval" else model.train()
    x = rng.normal(size=(BATCH, SIDE, SIDE, 3))
    r = rng.normal(size=(BATCH, 1000))
    got = {}
    with jax.enable_x64():
        for dtype in (jnp.float32, jnp.float64):
            for impl in ("cpu", "standard"):
                m = nnx.merge(*nnx.split(model))
                cga_jax.set_impl(m, impl)
                cast = lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a  # noqa: B023,E731
                nnx.update(m, jax.tree.map(cast, nnx.state(m)))
                got[impl, dtype] = _run(m, jnp.asarray(x, dtype), jnp.asarray(r, dtype))
    ref = got["standard", jnp.float64]
    assert np.abs(ref["logits"]).max() > 1.0  # well scaled, not degenerate
    assert set(got["cpu", jnp.float64]) == set(ref) and len(ref) > 100
    for k, v in ref.items():
        exact = _rel(got["cpu", jnp.float64][k], v)
        assert exact <= 1e-9 or np.linalg.norm(v) < 1e-12, f"{name} {mode} float64 {k}: {exact:.3g}"
    for k in ("logits", "d/d input"):
        cpu, std = (_rel(got[i, jnp.float32][k], ref[k]) for i in ("cpu", "standard"))
        assert cpu <= 2 * std + 1e-6, (
            f"{name} {mode} float32 {k}: cpu {cpu:.3g}, standard {std:.3g}"
        )
    params = [k for k in ref if k.startswith("d/d ") and k != "d/d input"]
    errs = {
        i: np.sqrt(sum(np.sum((got[i, jnp.float32][k] - ref[k]) ** 2) for k in params))
        / np.sqrt(sum(np.sum(ref[k] ** 2) for k in params))
        for i in ("cpu", "standard")
    }
    assert errs["cpu"] <= 2 * errs["standard"] + 1e-6, f"{name} {mode} float32 d/d params: {errs}"
