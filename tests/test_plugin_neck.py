"""The C2fCGA neck block and the YOLO-style neck example (examples/yolo_neck.py)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cga_jax.neck import C2fCGA

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "yolo_neck.py"


def test_c2fcga_shapes_and_identity_start():
    """Any map size; a fresh block's attention branch is zero (BN scale 0), so it is a C2f."""
    block = C2fCGA(24, 32, n=2, num_heads=4, key_dim=8, window=4, kernels=3, rngs=nnx.Rngs(0))
    block.eval()
    for h, w in [(5, 7), (2, 9)]:
        x = jnp.asarray(np.random.RandomState(h * w).randn(2, h, w, 24).astype(np.float32))
        y = block(x)
        assert y.shape == (2, h, w, 32)
        y_plain = block.cv2(
            jnp.concatenate(
                [*jnp.split(block.cv1(x), 2, -1)]
                + [block.m[0](jnp.split(block.cv1(x), 2, -1)[1])]
                + [block.m[1](block.m[0](jnp.split(block.cv1(x), 2, -1)[1]))],
                -1,
            )
        )
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain), atol=1e-6)


def test_c2fcga_rejects_bad_heads():
    with pytest.raises(ValueError, match="out_chs=30 cannot be split into num_heads=4"):
        C2fCGA(16, 30, num_heads=4, rngs=nnx.Rngs(0))


def test_yolo_neck_example_trains(capsys):
    spec = importlib.util.spec_from_file_location("yolo_neck", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(["--steps", "8", "--batch", "4", "--img", "48"])
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    out = capsys.readouterr().out
    assert "step   7" in out and "mean loss" in out
