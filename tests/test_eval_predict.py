"""`cga-jax eval` / `cga-jax predict`: the official eval transform, metrics against an independent
torchvision computation, exactly-once counting, unreadable files, class names, CLI errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

import cga_jax
from cga_jax.cli import main
from cga_jax.config import VARIANTS
from cga_jax.evaluate import evaluate
from cga_jax.keymap import to_timm_state_dict
from cga_jax.preprocess import eval_preprocess

TEST_VARIANT = "efficientvit_test"
CFG = cga_jax.EfficientViTConfig(
    embed_dim=(16, 32, 48),
    key_dim=(4, 4, 4),
    depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    img_size=64,
    num_classes=10,
)
# (class, file, (width, height), PIL mode or a corruption)
FILES = [
    ("ant", "a0.jpg", (300, 200), "RGB"),
    ("ant", "a1.png", (64, 64), "RGB"),
    ("ant", "a2.jpeg", (199, 250), "L"),
    ("ant", "a3.png", (150, 97), "RGBA"),
    ("ant", "broken.jpg", None, "garbage"),
    ("bee", "b0.JPG", (97, 301), "RGB"),
    ("bee", "sub/b1.png", (120, 80), "RGB"),
    ("bee", "b2.gif", (90, 90), "P"),
    ("bee", "notes.txt", None, "text"),
    ("cat", "c0.jpg", (256, 256), "RGB"),
    ("cat", "c1.bmp", (333, 222), "RGB"),
    ("cat", "c2.png", (100, 100), "truncated"),
    ("cat", "empty.jpg", None, "empty"),
]
N_IMAGES, N_BAD = 9, 3  # 12 image files; notes.txt is not an image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls, name, size, mode in FILES:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "garbage":
            path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.bytes(300))
        elif mode == "text":
            path.write_text("not an image")
        elif mode == "empty":
            path.write_bytes(b"")
        else:
            w, h = size
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
            if mode == "truncated":
                img.save(path)
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                continue
            img = img.convert(mode) if mode != "P" else img.quantize(16)
            img.save(path)
    return root


def _model(num_classes: int = 10) -> cga_jax.EfficientViT:
    """The tiny model, its pooled features (~1e-5 at initialisation) scaled up by the head's
    BatchNorm so that the logits are O(1) and well separated; classes 0-2 (the test folder's)
    favoured so that some top-1 hits happen."""
    model = cga_jax.EfficientViT(CFG.replace(num_classes=num_classes), rngs=nnx.Rngs(0))
    model.head.bn.scale[...] = model.head.bn.scale[...] * 1e5
    model.head.linear.bias[:3] = 0.5
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _reference(model, root, img_size=64, crop_pct=0.875):
    """Independent metrics: PIL decode, torchvision Resize/CenterCrop/ToTensor/Normalize."""
    tv = pytest.importorskip("torchvision.transforms")
    tf = tv.Compose(
        [
            tv.Resize(int(img_size / crop_pct), interpolation=tv.InterpolationMode.BICUBIC),
            tv.CenterCrop(img_size),
            tv.ToTensor(),
            tv.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    xs, labels = [], []
    for label, cls in enumerate(sorted(os.listdir(root))):
        for dirpath, _, names in os.walk(root / cls):
            for name in names:
                try:
                    with Image.open(os.path.join(dirpath, name)) as im:
                        im.load()
                        xs.append(tf(im.convert("RGB")).numpy().transpose(1, 2, 0))
                        labels.append(label)
                except Exception:  # noqa: BLE001 - unreadable: skipped
                    pass
    model.eval()
    logits = np.asarray(_forward(*nnx.split(model), np.stack(xs)), np.float64)
    labels = np.array(labels)
    top = np.sort(logits, axis=1)
    assert np.all(top[:, -1] - top[:, -2] > 1e-3), "near-tie: the top-1 comparison is fragile"
    order = np.argsort(-logits, axis=1)
    logp = logits - np.log(np.exp(logits - top[:, -1:]).sum(1, keepdims=True)) - top[:, -1:]
    return {
        "top1": 100.0 * np.mean(order[:, 0] == labels),
        "top5": 100.0 * np.mean((order[:, :5] == labels[:, None]).any(1)),
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "images": len(labels),
    }


@pytest.mark.torch
def test_eval_preprocess_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(1)
    for (h, w), size, crop_pct in [
        ((200, 333), 64, 0.875),  # odd crop offset (28.5 -> 28)
        ((301, 97), 64, 0.875),
        ((64, 64), 64, 0.875),
        ((73, 90), 64, 0.875),  # already the resize size on the short side
        ((250, 199), 224, 0.875),
        ((120, 45), 64, 1.1),  # crop larger than the resized image: zero padding
        ((480, 640), 224, 0.95),
    ]:
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        tf = tv.Compose(
            [
                tv.Resize(int(size / crop_pct), interpolation=tv.InterpolationMode.BICUBIC),
                tv.CenterCrop(size),
            ]
        )
        want = np.asarray(tf(Image.fromarray(img)))
        got = eval_preprocess(img, size, crop_pct)
        assert got.shape == want.shape == (size, size, 3), (h, w, size, crop_pct)
        np.testing.assert_array_equal(got, want, err_msg=f"{(h, w, size, crop_pct)}")


@pytest.mark.torch
def test_evaluate_matches_reference(folder):
    model = _model()
    ref = _reference(_model(), folder)
    got = evaluate(model, folder, batch_size=5, workers=2, progress=False)  # 5 does not divide 12
    print({k: v for k, v in got.items() if k != "skipped_files"}, ref)
    assert got["images"] == ref["images"] == N_IMAGES
    assert got["skipped"] == N_BAD and got["files"] == N_IMAGES + N_BAD
    assert sorted(os.path.basename(p) for p in got["skipped_files"]) == [
        "broken.jpg",
        "c2.png",
        "empty.jpg",
    ]
    assert got["top1"] == ref["top1"] and got["top5"] == ref["top5"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    assert 0 < got["top1"] < got["top5"] < 100
    # decoding inline gives the same; the model was not switched to eval mode
    assert model.head.bn.use_running_average is False
    again = evaluate(model, folder, batch_size=5, workers=0, progress=False)
    assert again["images"] == N_IMAGES and again["top1"] == got["top1"]
    np.testing.assert_allclose(again["loss"], got["loss"], rtol=1e-6)


@pytest.mark.slow
def test_evaluate_two_devices(folder, tmp_path):
    """Data-parallel over 2 (simulated) devices: same numbers, batch 5 padded to 6."""
    weights = _save(_model(), str(tmp_path / "w.safetensors"))
    code = (
        "import json, sys, jax\n"
        "from flax import nnx\n"
        "import cga_jax\n"
        "from cga_jax.evaluate import evaluate\n"
        "assert jax.local_device_count() == 2, jax.local_devices()\n"
        f"cfg = cga_jax.EfficientViTConfig(**{CFG.__dict__!r})\n"
        "m = cga_jax.EfficientViT(cfg, rngs=nnx.Rngs(0))\n"
        "cga_jax.loading.load_pretrained(m, sys.argv[2])\n"
        "r = evaluate(m, sys.argv[1], batch_size=5, progress=False)\n"
        "print(json.dumps({k: v for k, v in r.items() if k != 'skipped_files'}))\n"
    )
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), weights], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    one = evaluate(_model(), folder, batch_size=5, progress=False)
    assert two["images"] == N_IMAGES and two["skipped"] == N_BAD
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


@pytest.fixture
def variant(monkeypatch, tmp_path):
    """Registers ``efficientvit_test`` (a tiny config); returns a writer of its weights."""
    monkeypatch.setitem(VARIANTS, TEST_VARIANT, CFG)

    def weights(num_classes: int = 10, favour: int | None = None) -> str:
        model = _model(num_classes)
        if favour is not None:  # one class far ahead of the others
            model.head.linear.bias[favour] = 30.0
        return _save(model, str(tmp_path / f"w{num_classes}_{favour}.safetensors"))

    return weights


def _save(model, path: str) -> str:
    save_file({k: np.ascontiguousarray(v) for k, v in to_timm_state_dict(model).items()}, path)
    return path


def test_cli_eval(folder, variant, capsys, tmp_path, monkeypatch):
    w = variant()
    argv = ["eval", "--model", TEST_VARIANT, "--weights", w, "--batch-size", "5"]
    assert main([*argv, "--data", str(folder), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    lib = evaluate(_model(), folder, batch_size=5, progress=False)
    assert f"images: {N_IMAGES} (3 classes; {N_BAD} unreadable skipped)" in out
    assert f"top-1: {lib['top1']:.3f}%" in out and f"loss: {lib['loss']:.4f}" in out
    assert "skipped (unreadable):" in err and "broken.jpg" in err
    # clear errors, exit code 2
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    for data, expect in [
        (tmp_path / "nowhere", "no such directory"),
        (tmp_path / "flat", "no class folders"),
    ]:
        assert main([*argv, "--data", str(data)]) == 2
        assert expect in capsys.readouterr().err
    # strict: a checkpoint with another classifier size is an error (the variant guess that
    # follows the message builds every registered variant: slow, and not what is tested here)
    monkeypatch.setattr(cga_jax.loading, "_variant_hint", lambda model, sd: "")
    assert main([*argv, "--data", str(folder), "--num-classes", "2"]) == 2  # checkpoint has 10
    assert "does not fit" in capsys.readouterr().err


def test_class_names_package_data():
    names = cga_jax.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    assert names[207] == "golden retriever" and names[999].startswith("toilet tissue")
    from cga_jax.classes import imagenet_synsets

    syn = imagenet_synsets()
    assert syn == sorted(syn) and syn[0] == "n01440764" and len(set(syn)) == 1000


def test_cli_predict(folder, variant, capsys, tmp_path):
    imgs = [str(folder / "ant" / "a0.jpg"), str(folder / "bee" / "b2.gif")]
    w = variant(1000, favour=207)
    argv = ["predict", "--model", TEST_VARIANT, "--weights", w, "--num-classes", "1000"]
    assert main([*argv, *imgs]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == imgs[0] and out[6] == imgs[1] and len(out) == 12
    assert "100.00%   207  golden retriever" in out[1] and "golden retriever" in out[7]
    # a 10-class model: indices, or names from --class-names; unreadable file: error, exit 2
    w10 = variant(10, favour=3)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"name{i}\n" for i in range(10)))
    argv = ["predict", "--model", TEST_VARIANT, "--weights", w10, "--topk", "2"]
    assert main([*argv, imgs[0]]) == 0
    assert "   3  class 3" in capsys.readouterr().out
    assert main([*argv, "--class-names", str(names), imgs[0], str(folder / "cat/c2.png")]) == 2
    out, err = capsys.readouterr()
    assert "   3  name3" in out and len(out.splitlines()) == 3
    assert "c2.png: cannot read the image" in err
    names.write_text("a\nb\n")
    assert main([*argv, "--class-names", str(names), imgs[0]]) == 2
    assert "2 names for a model with 10 classes" in capsys.readouterr().err


def test_folder_labels():
    """Folders named by ImageNet synsets take their ImageNet-1k index with a 1000-class model
    (a subset of the validation classes scores correctly); otherwise the sorted position."""
    from cga_jax.classes import imagenet_synsets
    from cga_jax.evaluate import folder_labels

    syn = imagenet_synsets()
    assert folder_labels([syn[5], syn[900]], 1000) == [5, 900]
    assert folder_labels([syn[5], syn[900]], 10) == [0, 1]
    assert folder_labels(["ant", "bee"], 1000) == [0, 1]
    with pytest.raises(ValueError, match="3 class folders but the model has 2"):
        folder_labels(["a", "b", "c"], 2)
