"""Test setup: full-precision matmuls (TF32 is the default on GPU), fixture paths."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("CGA_JAX_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not (FIXTURES / "official_m0.npz").exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set CGA_JAX_FIXTURES)")
    return FIXTURES
