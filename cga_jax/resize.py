"""Resampling of attention-bias tables when a window resolution changes.

timm resizes a ``(num_heads, S1*S1)`` table to ``(num_heads, S2*S2)`` with
``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` on the ``(S1, S1)`` grid.
This is the same separable filter (PIL's bicubic, a = -0.5, widened by the scale when shrinking),
written in numpy so the result does not depend on torch being installed.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased bicubic resampling along one axis."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        j = np.arange(xmin, xmax)
        k = _cubic((j - center + 0.5) * invscale)
        total = k.sum()
        w[i, xmin:xmax] = k / total if total != 0 else k
    return w


def resize_bias_grid(table: np.ndarray, s_out: int) -> np.ndarray:
    """(H, S, S) -> (H, s_out, s_out), antialiased bicubic (align_corners=False)."""
    s_in = table.shape[-1]
    m = _resample_matrix(s_in, s_out)
    out = np.einsum("oi,hij,pj->hop", m, table.astype(np.float64), m)
    return out.astype(table.dtype)


def resize_attention_biases(table: np.ndarray, new_len: int) -> np.ndarray | None:
    """(num_heads, L1) -> (num_heads, new_len) for square L1, new_len; None if not square."""
    heads, old_len = table.shape
    s1, s2 = int(round(old_len**0.5)), int(round(new_len**0.5))
    if s1 * s1 != old_len or s2 * s2 != new_len:
        return None
    if s1 == s2:
        return table
    return resize_bias_grid(table.reshape(heads, s1, s1), s2).reshape(heads, new_len)
