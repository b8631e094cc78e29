"""Shared assertions."""

from __future__ import annotations

import numpy as np


def assert_logits_close(out, ref, what: str = "logits") -> float:
    """The project's parity bar: max|out - ref| <= 1e-4 * max(1, max|ref|). Returns the error."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} vs reference {ref.shape}"
    err = float(np.max(np.abs(out - ref)))
    tol = 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol, (
        f"{what}: max|diff| = {err:.3g} > {tol:.3g} (max|ref| = {np.abs(ref).max():.3g})"
    )
    return err


def assert_rel_l2(out, ref, tol: float = 1e-4, what: str = "gradient") -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} vs reference {ref.shape}"
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    assert rel <= tol, f"{what}: relative L2 error {rel:.3g} > {tol:g}"
    return rel


def assert_grads_close(ours: dict, refs: dict, tol: float = 1e-4, what: str = "") -> dict:
    """Per-parameter relative L2 error <= tol. Gradients that are exactly zero in exact arithmetic
    (e.g. a BN bias whose shift the next training-mode BN removes) show up as rounding noise, where
    a relative error means nothing: for those (reference norm below 1e-8 x the median norm) the
    assertion is that ours is also ~0, |ours| <= tol x the median norm."""
    norms = {k: float(np.linalg.norm(np.asarray(v, np.float64))) for k, v in refs.items()}
    typical = float(np.median(list(norms.values())))
    errors = {}
    for k, ref in refs.items():
        got = np.asarray(ours[k], np.float64)
        if norms[k] < 1e-8 * typical:
            size = float(np.linalg.norm(got))
            assert size <= tol * typical, f"{what} d/d {k}: should be ~0, |grad| = {size:.3g}"
            errors[k] = size / typical
        else:
            errors[k] = assert_rel_l2(got, ref, tol=tol, what=f"{what} d/d {k}")
    return errors
