"""DeiT knowledge distillation: the loss against DeiT's formula, a short run with a teacher."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import TINY_MODEL, tiny_digits_config

from cga_jax.training.distill import distillation_loss


def _logits(seed, b=6, k=5):
    r = np.random.RandomState(seed)
    s, d, t = (r.randn(b, k).astype(np.float32) * 3 for _ in range(3))
    y = r.dirichlet(np.ones(k), size=b).astype(np.float32)  # soft (mixed / smoothed) targets
    return s, d, t, y


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def deit_numpy(s, d, t, y, kind, alpha, tau):
    """DeiT DistillationLoss with SoftTargetCrossEntropy as the base criterion."""
    base = np.mean(np.sum(-y * _log_softmax(s), -1))
    if kind == "soft":
        lt, ls = _log_softmax(t / tau), _log_softmax(d / tau)
        dist = np.sum(np.exp(lt) * (lt - ls)) * tau * tau / d.size  # reduction sum / numel
    else:
        dist = np.mean(-_log_softmax(d)[np.arange(len(d)), t.argmax(-1)])
    return base * (1 - alpha) + dist * alpha


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0)])
def test_loss_matches_deit_formula(kind, alpha, tau):
    s, d, t, y = _logits(0)
    got = distillation_loss(*map(jnp.asarray, (s, d, t, y)), jnp.ones(6), kind, alpha, tau)
    assert float(got) == pytest.approx(deit_numpy(s, d, t, y, kind, alpha, tau), rel=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_loss_matches_deit_torch(kind):
    """The DeiT code path itself, in torch (F.kl_div sum / numel, F.cross_entropy)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, d, t, y = _logits(1)
    alpha, tau = 0.5, 2.0
    S, D, T, Y = map(torch.from_numpy, (s, d, t, y))
    base = torch.sum(-Y * F.log_softmax(S, dim=-1), dim=-1).mean()
    if kind == "soft":
        dist = (
            F.kl_div(
                F.log_softmax(D / tau, dim=1),
                F.log_softmax(T / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / D.numel()
        )
    else:
        dist = F.cross_entropy(D, T.argmax(dim=1))
    want = float(base * (1 - alpha) + dist * alpha)
    got = distillation_loss(*map(jnp.asarray, (s, d, t, y)), jnp.ones(6), kind, alpha, tau)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_invalid_records_are_left_out_and_none_kind():
    s, d, t, y = _logits(2)
    valid = np.array([1, 1, 0, 1, 0, 1], np.float32)
    keep = valid > 0
    for kind in ("soft", "hard"):
        got = distillation_loss(*map(jnp.asarray, (s, d, t, y, valid)), kind, 0.5, 1.0)
        want = deit_numpy(s[keep], d[keep], t[keep], y[keep], kind, 0.5, 1.0)
        assert float(got) == pytest.approx(want, rel=1e-5)
    # no teacher: class and distillation heads both on the targets
    both = distillation_loss(*map(jnp.asarray, (s, d)), None, jnp.asarray(y), jnp.ones(6))
    ce = lambda z: np.mean(np.sum(-y * _log_softmax(z), -1))  # noqa: E731
    assert float(both) == pytest.approx(0.5 * (ce(s) + ce(d)), rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(*map(jnp.asarray, (s, d)), None, jnp.asarray(y), jnp.ones(6), "soft")


def test_eval_output_is_the_mean_of_both_heads():
    from flax import nnx

    from cga_jax import EfficientViT, EfficientViTConfig

    m = EfficientViT(
        EfficientViTConfig(img_size=32, distillation=True, **TINY_MODEL), rngs=nnx.Rngs(0)
    )
    m.eval()
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    pooled = m.forward_head(m.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(
        m(x), (m.head(pooled) + m.head_dist(pooled)) / 2, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow  # ~1 min of XLA compilation on 2 CPU cores (3 min when they are shared)
def test_short_run_with_a_teacher(tmp_path, kind="soft"):
    """A few steps on digits with every recipe augmentation on and a (random) tiny teacher (the
    loss kinds differ only in the unit-tested loss)."""
    from cga_jax.training.logger import read_log
    from cga_jax.training.trainer import train_and_evaluate

    cfg = tiny_digits_config(
        **{"total_steps": 3, "log_every": 1, "eval_every": 3, "checkpoint_every": 3}
    )
    cfg.distill.kind = kind
    cfg.distill.teacher.name = "efficientvit_m0"
    cfg.distill.teacher.update(TINY_MODEL)
    cfg.data.update(randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=3)
    with pytest.warns(UserWarning, match="teacher is random"):
        res = train_and_evaluate(cfg, str(tmp_path))
    losses = [r["train_loss"] for r in read_log(str(tmp_path / "log.jsonl")) if "train_loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert res["step"] == 3 and 0.0 <= res["val_top1"] <= 100.0
