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
    assert out["moved"] > 1e-4  # the steps really changed the parameters
    for a, b in zip(out["losses8"], out["losses1"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert out["max_diff"] < 1e-4  # relative, per leaf: reduction order only
