"""Converter output formats (safetensors / Orbax) and the hf-hub source, offline, without torch."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import cga_jax
from cga_jax.cli import main
from cga_jax.convert import convert, read_converted, resolve_source
from cga_jax.weights import to_timm_state_dict

MODEL = "efficientvit_m0"
HUB = "timm/efficientvit_m0.r224_in1k"


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> str:
    """A timm-layout .safetensors of a randomly initialised efficientvit_m0 (64 px, 5 classes)."""
    model = cga_jax.create_model(MODEL, img_size=64, num_classes=5, rngs=nnx.Rngs(3))
    path = str(tmp_path_factory.mktemp("src") / "model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in to_timm_state_dict(model).items()}, path)
    return path


@pytest.fixture(autouse=True)
def _no_variant_guess(monkeypatch):
    """convert() guesses the variant by building every registered one (slow on a loaded CPU);
    the guess is tested in test_convert.py, not here."""
    import cga_jax.variants

    monkeypatch.setattr(cga_jax.variants, "guess_variant", lambda sd: None)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _logits(weights) -> np.ndarray:
    """(2, 5) logits of the model loaded from ``weights`` (one compilation for all calls)."""
    model = cga_jax.create_model(MODEL, pretrained=weights, img_size=64, num_classes=5)
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    return np.asarray(_forward(*nnx.split(model), x))


def test_convert_orbax_equals_safetensors(timm_file, tmp_path):
    kw = {"img_size": 64, "num_classes": 5}
    convert(MODEL, timm_file, str(tmp_path / "st"), **kw)  # default: safetensors only
    convert(MODEL, timm_file, str(tmp_path / "ob"), fmt="orbax", **kw)
    assert sorted(os.listdir(tmp_path / "st")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "ob")) == ["config.json", "orbax"]
    argv = [
        "convert",
        "--model",
        MODEL,
        "--src",
        timm_file,
        "--img-size",
        "64",
        "--num-classes",
        "5",
    ]
    assert main([*argv, "--out", str(tmp_path / "both"), "--format", "both"]) == 0
    assert sorted(os.listdir(tmp_path / "both")) == ["config.json", "model.safetensors", "orbax"]
    ref = _logits(tmp_path / "st")
    np.testing.assert_array_equal(_logits(tmp_path / "ob"), ref)
    np.testing.assert_array_equal(_logits(tmp_path / "ob" / "orbax"), ref)  # the Orbax dir alone
    st, _ = read_converted(str(tmp_path / "st"))
    ob, meta = read_converted(str(tmp_path / "ob"))
    assert meta["format"] == "orbax" and set(st) == set(ob)
    for k, v in st.items():
        assert ob[k].dtype == v.dtype and np.array_equal(ob[k], v), k


def test_convert_orbax_atomic(timm_file, tmp_path, monkeypatch):
    import cga_jax.convert as cv

    def boom(flat, path):
        os.makedirs(path)
        raise OSError("disk full")

    monkeypatch.setattr(cv, "save_orbax", boom)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk full"):
        convert(
            MODEL, timm_file, str(tmp_path / "out" / "m"), fmt="both", img_size=64, num_classes=5
        )
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(cga_jax.CheckpointError, match="unknown format"):
        convert(MODEL, timm_file, str(tmp_path / "out" / "m"), fmt="npz")


def test_hf_hub_from_offline_cache(timm_file, tmp_path, monkeypatch):
    """hf-hub:org/name resolves through huggingface_hub's real cache lookup (offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    blob = repo / "blobs" / "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    snap = repo / "snapshots" / rev / "model.safetensors"
    for d in (blob.parent, snap.parent, repo / "refs"):
        d.mkdir(parents=True)
    blob.write_bytes(open(timm_file, "rb").read())
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    path = resolve_source(f"hf-hub:{HUB}")
    assert os.path.realpath(path) == os.path.realpath(blob)
    out = tmp_path / "m0"
    argv = ["convert", "--model", MODEL, "--src", f"hf-hub:{HUB}", "--out", str(out)]
    assert main([*argv, "--img-size", "64", "--num-classes", "5"]) == 0
    want = load_file(timm_file)
    got, meta = read_converted(str(out))
    assert meta["source"] == f"hf-hub:{HUB}" and set(got) == set(want)
    model = cga_jax.create_model(MODEL, pretrained=out, img_size=64, num_classes=5)
    loaded = to_timm_state_dict(model)
    for k, v in want.items():
        assert np.array_equal(got[k], v) and np.array_equal(loaded[k], v), k
