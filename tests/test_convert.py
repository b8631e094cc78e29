"""Converter, BN folding, PyTorch export, serving export (fixtures in ../shared/fixtures)."""

from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from utils import assert_logits_close

import cga_jax
from cga_jax.checkpoint_io import read_converted
from cga_jax.cli import main
from cga_jax.convert import convert
from cga_jax.loading import load_pretrained

torch = pytest.importorskip("torch")

TINY = "official_tiny"


def _tiny(fixtures_dir):
    z = np.load(fixtures_dir / f"{TINY}.npz", allow_pickle=False)
    cfg = cga_jax.EfficientViTConfig(**ast.literal_eval(str(z["config"])))
    model = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))
    load_pretrained(model, fixtures_dir / f"{TINY}.pth")
    return z, model, jnp.asarray(z["input"].transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", [TINY, pytest.param("official_m0", marks=pytest.mark.slow)])
def test_fused_matches_official_fusion(fixtures_dir, case):
    if case == TINY:
        z, model, x = _tiny(fixtures_dir)
    else:
        z = np.load(fixtures_dir / f"{case}.npz", allow_pickle=False)
        model = cga_jax.create_model("efficientvit_m0", pretrained=fixtures_dir / f"{case}.pth")
        x = jnp.asarray(z["input"].transpose(0, 2, 3, 1))
    fused = cga_jax.fuse_bn(model)
    assert not list(nnx.state(fused, nnx.BatchStat)), "a BatchNorm survived the folding"
    assert list(nnx.state(model, nnx.BatchStat)), "fuse_bn modified its input"
    out = nnx.jit(lambda m, v: m(v))(fused, x)
    err = assert_logits_close(out, z["logits_fused"], f"{case} fused vs official fused")
    model.eval()
    err2 = assert_logits_close(out, model(x), f"{case} fused vs unfused")
    print(f"{case}: fused vs official {err:.2e}, vs unfused {err2:.2e}")


def _randomize_bn(model, seed):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)

    def f(path, v):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        v = np.asarray(v)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
        if name in ("mean", "bias") or (name == "scale"):
            return jnp.asarray(rng.normal(0.5 if name == "scale" else 0, 0.3, v.shape), jnp.float32)
        return jnp.asarray(v)

    import jax

    pure = jax.tree_util.tree_map_with_path(f, pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


VARIANT_CASES = ["efficientvit_m0"] + [
    pytest.param(f"efficientvit_m{i}", marks=pytest.mark.slow) for i in range(1, 6)
]


@pytest.mark.parametrize("name", VARIANT_CASES)
def test_fused_vs_unfused_variants(name):
    model = cga_jax.create_model(name, num_classes=1000)
    _randomize_bn(model, 0)
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 224, 224, 3)), jnp.float32)
    ref = nnx.jit(lambda m, v: m(v))(model, x)
    out = nnx.jit(lambda m, v: m(v))(cga_jax.fuse_bn(model), x)
    err = assert_logits_close(out, ref, f"{name} fused vs unfused")
    print(f"{name}: {err:.2e}")


def _assert_bitwise(orig: dict, back: dict):
    assert set(orig) == set(back), f"keys differ: {sorted(set(orig) ^ set(back))[:10]}"
    for k, v in orig.items():
        assert v.dtype == back[k].dtype, f"{k}: dtype {v.dtype} vs {back[k].dtype}"
        assert torch.equal(v, back[k]), f"{k}: values differ"


def test_round_trip_official(fixtures_dir, tmp_path):
    orig = torch.load(fixtures_dir / f"{TINY}.pth", weights_only=True)["model"]
    z = np.load(fixtures_dir / f"{TINY}.npz", allow_pickle=False)
    cfg = cga_jax.EfficientViTConfig(**ast.literal_eval(str(z["config"])))
    # convert through the library with a custom config: load the converted dir back
    model = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(1))
    load_pretrained(model, fixtures_dir / f"{TINY}.pth")
    sd_back = cga_jax.export_torch(model, "official", _nbt(orig))
    _assert_bitwise(orig, sd_back)


def _nbt(orig_official) -> dict:
    from cga_jax.keymap import official_to_timm

    timm = official_to_timm({k: v.numpy() for k, v in orig_official.items()})
    return {k: int(v) for k, v in timm.items() if k.endswith("num_batches_tracked")}


def test_round_trip_m0_through_cli(fixtures_dir, tmp_path):
    """official .pth -> `cga-jax convert` dir -> `cga-jax export-torch` (official and timm)."""
    src = fixtures_dir / "official_m0.pth"
    out = tmp_path / "m0"
    assert (
        main(["convert", "--model", "efficientvit_m0", "--src", str(src), "--out", str(out)]) == 0
    )
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = tmp_path / "back.pth"
    assert (
        main(
            [
                "export-torch",
                "--model",
                "efficientvit_m0",
                "--weights",
                str(out),
                "--out",
                str(back),
            ]
        )
        == 0
    )
    orig = torch.load(src, weights_only=True)["model"]
    _assert_bitwise(orig, torch.load(back, weights_only=True)["model"])
    # timm -> cga_jax -> timm
    from cga_jax.keymap import official_to_timm

    # a timm state dict has no attention_bias_idxs (timm keeps that buffer out of it)
    timm_sd = {k: v for k, v in official_to_timm(orig).items() if "attention_bias_idxs" not in k}
    timm_file = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_sd.items()}, timm_file)
    out2 = tmp_path / "m0t"
    assert (
        main(["convert", "--model", "efficientvit_m0", "--src", str(timm_file), "--out", str(out2)])
        == 0
    )
    back2 = tmp_path / "back_timm.safetensors"
    assert (
        main(
            [
                "export-torch",
                "--model",
                "efficientvit_m0",
                "--weights",
                str(out2),
                "--out",
                str(back2),
                "--layout",
                "timm",
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    _assert_bitwise(timm_sd, load_file(back2))
    # create_model accepts the converted directory
    z = np.load(fixtures_dir / "official_m0.npz", allow_pickle=False)
    model = cga_jax.create_model("efficientvit_m0", pretrained=out)
    model.eval()
    x = jnp.asarray(z["input"][:1].transpose(0, 2, 3, 1))
    assert_logits_close(nnx.jit(lambda m, v: m(v))(model, x), z["logits_eval"][:1])
    sd, meta = read_converted(str(out))
    assert meta["model"] == "efficientvit_m0" and meta["source_layout"] == "official"


# ------------------------------------------------------------------------------------------
# bad inputs: one clear error each, nothing written
# ------------------------------------------------------------------------------------------
def _bad_cases(fixtures_dir, tmp_path):
    orig = torch.load(fixtures_dir / f"{TINY}.pth", weights_only=True)["model"]
    m0 = fixtures_dir / "official_m0.pth"
    cases = {}
    tmp_path.mkdir(parents=True, exist_ok=True)

    def save(name, obj):
        p = tmp_path / name
        torch.save(obj, p)
        return p

    cases["wrong variant"] = ("efficientvit_m1", m0, {}, "looks like efficientvit_m0")
    sd = torch.load(m0, weights_only=True)["model"]
    missing = {k: v for k, v in sd.items() if "blocks2.0" not in k}
    cases["missing keys"] = (
        "efficientvit_m0",
        save("missing.pth", {"model": missing}),
        {},
        "missing in the checkpoint",
    )
    extra = dict(sd, **{"blocks1.0.extra.weight": torch.zeros(3)})
    cases["unexpected keys"] = (
        "efficientvit_m0",
        save("extra.pth", {"model": extra}),
        {},
        "unexpected in the checkpoint",
    )
    shape = dict(sd)
    shape["patch_embed.0.c.weight"] = torch.zeros(8, 3, 5, 5)
    cases["wrong shapes"] = (
        "efficientvit_m0",
        save("shape.pth", {"model": shape}),
        {},
        "shape mismatches",
    )
    data = m0.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    cases["truncated"] = ("efficientvit_m0", tmp_path / "trunc.pth", {}, "not a readable")
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty"] = ("efficientvit_m0", tmp_path / "empty.pth", {}, "empty")
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    cases["text"] = ("efficientvit_m0", tmp_path / "notes.txt", {}, "not a readable")
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    cases["jpeg"] = ("efficientvit_m0", tmp_path / "img.jpg", {}, "not a readable")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    cases["code pickle"] = ("efficientvit_m0", tmp_path / "evil.pth", {}, "weights_only")
    cases["num classes"] = (
        "efficientvit_m0",
        fixtures_dir / f"{TINY}.pth",
        {},
        "does not fit",
    )  # tiny backbone: variant + head both wrong
    head = dict(sd)
    head["head.l.weight"] = torch.zeros(10, 192)
    head["head.l.bias"] = torch.zeros(10)
    head["head.bn.weight"] = sd["head.bn.weight"]
    cases["num classes m0"] = (
        "efficientvit_m0",
        save("head10.pth", {"model": head}),
        {},
        "--num-classes",
    )
    cases["unknown hub"] = (
        "efficientvit_m0",
        "hf-hub:nobody/no_such_model_xyz",
        {},
        "Hugging Face hub",
    )
    cases["unknown model"] = ("efficientvit_m9", m0, {}, "unknown model")
    (tmp_path / "a_file").write_text("in the way")  # missing parents are created; a file is not
    cases["not writable"] = (
        "efficientvit_m0",
        m0,
        {"out": tmp_path / "a_file" / "sub" / "x"},
        "cannot write",
    )
    del orig
    return cases, marker


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_inputs(fixtures_dir, tmp_path, monkeypatch, capsys):
    # the hub case must fail without the network: nothing listens on that port
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("CGA_JAX_CACHE", str(tmp_path / "cache"))
    cases, marker = _bad_cases(fixtures_dir, tmp_path / "in")
    assert len(cases) >= 12
    for what, (model, src, kw, expect) in cases.items():
        out = kw.get("out", tmp_path / "out" / what.replace(" ", "_"))
        os.makedirs(tmp_path / "out", exist_ok=True)
        rc = main(["convert", "--model", model, "--src", str(src), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, f"{what}: exit code {rc}"
        assert expect in err, f"{what}: expected {expect!r} in: {err}"
        assert not os.path.exists(out), f"{what}: output left behind"
        print(f"--- {what}:\n{err.strip()[:400]}")
    assert os.listdir(tmp_path / "out") == [], "temporary files left behind"
    assert not marker.exists(), "the pickle executed code"


def test_half_precision_accepted(fixtures_dir, tmp_path, capsys):
    sd = torch.load(fixtures_dir / "official_m0.pth", weights_only=True)["model"]
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        p = tmp_path / f"{dtype}.pth"
        torch.save({"model": half}, p)
        out = tmp_path / f"out_{str(dtype)[6:]}"
        assert (
            main(["convert", "--model", "efficientvit_m0", "--src", str(p), "--out", str(out)]) == 0
        )
        assert "cast to float32" in capsys.readouterr().err
        back, _ = read_converted(str(out))
        w = back["patch_embed.conv1.conv.weight"]
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, half["patch_embed.0.c.weight"].float().numpy())


def test_num_classes_and_img_size(fixtures_dir, tmp_path):
    out = tmp_path / "ft"
    convert(
        "efficientvit_m0",
        str(fixtures_dir / "official_m0.pth"),
        str(out),
        num_classes=7,
        img_size=256,
    )
    model = cga_jax.create_model("efficientvit_m0", pretrained=out, num_classes=7, img_size=256)
    assert model.head.linear.kernel.shape == (192, 7)
    # export-torch takes the class count and image size from the converted directory
    pth = tmp_path / "ft.pth"
    argv = ["export-torch", "--model", "efficientvit_m0", "--weights", str(out), "--out", str(pth)]
    assert main(argv) == 0
    sd = torch.load(pth, weights_only=True)["model"]
    assert tuple(sd["head.l.weight"].shape) == (7, 192)
    notes = convert(
        "efficientvit_m0", str(fixtures_dir / "official_m0.pth"), str(out), img_size=288
    )
    assert any("resized" in n for n in notes)


def test_serving_export_fresh_process(fixtures_dir, tmp_path):
    z, model, x = _tiny(fixtures_dir)
    from cga_jax.serving import export_serving

    art = tmp_path / "tiny.jax"
    art.write_bytes(export_serving(model, 80))
    np.save(tmp_path / "x.npy", np.asarray(x))
    code = (
        "import sys, numpy as np, jax\n"
        "assert 'cga_jax' not in sys.modules\n"
        "exp = jax.export.deserialize(bytearray(open(sys.argv[1],'rb').read()))\n"
        "x = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], np.asarray(exp.call(x)))\n"
        "np.save(sys.argv[4], np.asarray(exp.call(np.concatenate([x, x, x]))))\n"
    )
    env = dict(os.environ, PYTHONPATH="", JAX_PLATFORMS="cpu")
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(art),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
            str(tmp_path / "y3.npy"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    y = np.load(tmp_path / "y.npy")
    assert_logits_close(y, z["logits_fused"], "reloaded artifact vs official fused")
    y3 = np.load(tmp_path / "y3.npy")
    assert y3.shape == (6, 10)
    np.testing.assert_allclose(y3[:2], y, rtol=1e-5, atol=1e-5)
