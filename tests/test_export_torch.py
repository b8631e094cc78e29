"""``export_torch`` gives each PyTorch model exactly its own state dict: the official one (keys,
order, shapes and dtypes of the fixture's, recorded from the official code) and timm's
(``load_state_dict(strict=True)`` into the timm the extras pin, live)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from utils import assert_logits_close

import cga_jax
from cga_jax.torch_export import export_state_dict

VARIANTS = [f"efficientvit_m{i}" for i in range(6)]


def _shape(v) -> str:
    return "x".join(str(d) for d in np.shape(v))


def test_official_layout_is_the_official_state_dict(fixtures_dir):
    """Key for key (in order), shape and dtype, as the official EfficientViT-M0 saves it;
    numpy only (no torch)."""
    z = np.load(fixtures_dir / "official_m0.npz", allow_pickle=False)
    sd = export_state_dict(cga_jax.create_model("efficientvit_m0"), "official")
    want = list(zip(z["keys"].tolist(), z["shapes"].tolist(), z["dtypes"].tolist(), strict=True))
    got = [(k, _shape(v), str(v.dtype)) for k, v in sd.items()]
    assert [g[0] for g in got] == [w[0] for w in want], "keys or their order differ"
    assert got == want


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_layout_loads_strictly_into_timm(name):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    model = cga_jax.create_model(name, rngs=nnx.Rngs(1))
    sd = cga_jax.export_torch(model, layout="timm")
    tm = timm.create_model(name, pretrained=False)
    tm.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key
    own = tm.state_dict()
    assert list(sd) == list(own), "key order differs from timm's state_dict()"
    for k, v in own.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    assert "attention_bias_idxs" not in " ".join(sd)  # timm keeps it out of its state dict
    if name != "efficientvit_m0":
        return
    # the exported values mean the same to timm: same logits (non-trivial BN statistics and
    # attention biases first, so that a mix-up of them shows)
    _randomize(model, seed=2)
    tm.load_state_dict(cga_jax.export_torch(model, layout="timm"), strict=True)
    model.eval()
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x))
    assert_logits_close(out, ref, f"{name}: cga_jax vs timm loaded from export_torch")


def _randomize(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    draw = {
        "var": lambda s: rng.uniform(0.5, 2.0, s),
        "mean": lambda s: rng.normal(0.0, 0.1, s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "attention_biases": lambda s: rng.normal(0.0, 0.5, s),
    }
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for path, v in flat.items():
        if path[-1] in draw:
            flat[path] = jnp.asarray(draw[path[-1]](v.shape), jnp.float32)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
