"""Converter output formats (safetensors / Orbax), without torch."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import cga_jax
import cga_jax.checkpoint_io
import cga_jax.convert
from cga_jax.checkpoint_io import check_out_dir, read_converted
from cga_jax.cli import main
from cga_jax.convert import convert
from cga_jax.errors import CheckpointError
from cga_jax.keymap import to_timm_state_dict

MODEL = "efficientvit_m0"


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
    monkeypatch.setattr(cga_jax.convert, "guess_variant", lambda sd: None)


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
    def boom(flat, path):
        os.makedirs(path)
        raise OSError("disk full")

    monkeypatch.setattr(cga_jax.checkpoint_io, "save_orbax", boom)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk full"):
        convert(
            MODEL, timm_file, str(tmp_path / "out" / "m"), fmt="both", img_size=64, num_classes=5
        )
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(cga_jax.CheckpointError, match="unknown format"):
        convert(MODEL, timm_file, str(tmp_path / "out" / "m"), fmt="npz")


def test_convert_reads_its_source_once(timm_file, tmp_path, monkeypatch):
    reads = []
    real = cga_jax.checkpoint_io._load_raw
    monkeypatch.setattr(cga_jax.checkpoint_io, "_load_raw", lambda p: reads.append(p) or real(p))
    convert(MODEL, timm_file, str(tmp_path / "m"), img_size=64, num_classes=5)
    assert reads == [timm_file]


def test_out_dir_parents_are_created_but_a_file_in_the_way_is_an_error(tmp_path):
    """``--out weights/m0`` works without ``weights/`` (as ``mkdir -p``); a file where a
    directory must go fails before any work."""
    check_out_dir(str(tmp_path / "a" / "b" / "m0"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a writable directory"):
        check_out_dir(str(tmp_path / "f" / "m0"))
    with pytest.raises(CheckpointError, match="not a directory"):
        check_out_dir(str(tmp_path / "f"))
