"""The demo runs from an installed wheel: the wheel holds the trainer and the demo's config, and
they import (and the config checks) from outside the checkout, without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.train_helpers import ROOT

pytest.importorskip("setuptools")  # the build backend (the `test` extra installs it)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``pip wheel --no-deps`` of a copy of the sources (the build leaves ``build/`` and
    ``*.egg-info`` next to them); no build isolation, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cga_jax", src / "cga_jax", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("cga_jax-*.whl")
    return whl


def test_wheel_holds_the_demo_and_the_trainer(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    training = sorted(p.name for p in (ROOT / "cga_jax" / "training").glob("*.py"))
    assert {f"cga_jax/training/{n}" for n in training} <= names
    assert {
        "cga_jax/demo.py",
        "cga_jax/preprocess.py",
        "cga_jax/data/imagenet_classes.txt",
    } <= names
    assert not any(n.startswith(("configs/", "tests/", "bench/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    core = [
        ln for ln in text.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln
    ]
    train = [ln for ln in text.splitlines() if 'extra == "train"' in ln]
    assert not any(t in ln for ln in core + train for t in ("torch", "timm"))
    assert {"grain", "scikit-learn", "matplotlib"} <= {ln.split()[1].split(">")[0] for ln in train}


def test_demo_config_imports_from_the_installed_wheel(wheel, tmp_path):
    """Unpacked wheel on the path, the checkout not: the demo module and its config import, the
    config passes the start-up check, and ``configs/`` is not needed."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import cga_jax, cga_jax.demo\n"
        "from cga_jax.training.recipe import digits\n"
        "from cga_jax.training.validate import check_config\n"
        "cfg = digits(); check_config(cfg)\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('configs') is None\n"
        "import json\n"
        "print(json.dumps([cga_jax.__file__, cfg.data.name, cfg.model.embed_dim]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path, name, dims = json.loads(r.stdout.strip().splitlines()[-1])
    assert path.startswith(str(site)) and name == "digits" and dims == [32, 48, 64], r.stdout
