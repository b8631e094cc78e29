"""A training step on 8 simulated CPU devices equals the 1-device step on the same global batch."""

from __future__ import annotations

import json
import sys

from tests.train_helpers import ROOT, run


def test_8_devices_equal_1_device():
    r = run(
        [sys.executable, str(ROOT / "tests/multidevice_step.py"), str(ROOT)],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out["n"] == 8
    assert out["moved_max"] > 1e-3  # the SGD step really moved the parameters
    for k in ("train_loss", "grad_norm"):  # global-batch loss and gradient
        assert abs(out["m8"][k] - out["m1"][k]) <= 2e-6 * abs(out["m1"][k]), k
    # BN running statistics (global batch) and every parameter's SGD step (= its gradient), both
    # relative to the leaf's / the step's largest magnitude: float32 reduction order only.
    assert out["bn_stats_rel"] < 1e-4
    assert out["grad_rel"] < 1e-4
