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
    assert out["moved_median"] > 1e-3  # the step really moved the parameters (lr 5e-3)
    for k in ("train_loss", "grad_norm"):  # global-batch loss and gradient
        assert abs(out["m8"][k] - out["m1"][k]) <= 2e-6 * abs(out["m1"][k]), k
    assert out["bn_stats_rel"] < 1e-5  # BN statistics over the global batch, both ways
    # Adam's first update is ~lr * sign(g): only gradient entries within reduction noise of 0 can
    # flip, so almost all parameters agree to 1e-6 and none differs by more than 2 * lr.
    assert out["param_frac_gt_1e-6"] < 1e-3
    assert out["param_max_abs"] <= 2 * 5e-3 + 1e-6
