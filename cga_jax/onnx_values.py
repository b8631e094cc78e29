"""Values of the jaxpr -> ONNX converter: a JAX value's *logical* shape (what the jaxpr says) and
where its data lives (a constant, or an ONNX tensor stored in some axis order).

Layout is tracked, not fixed: an ONNX tensor may hold a value's axes in any order (``perm``), so
NHWC values can live as NCHW tensors between ONNX ``Conv`` nodes and a JAX ``transpose`` costs
nothing. A value may also carry a *pending broadcast* (``bshape``: size 1 where ``shape`` is
larger): elementwise ONNX ops broadcast by themselves, so ``broadcast_in_dim`` only inserts axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

SENTINEL = 1_000_003  # a prime standing in for the symbolic batch in size arithmetic


@dataclasses.dataclass(frozen=True)
class Val:
    """One JAX value. ``shape``: logical (JAX) shape, ints or symbolic dims.

    Exactly one of ``const`` (numpy, logical axis order, shape ``bshape``) and ``name`` (an ONNX
    tensor whose axis ``j`` is logical axis ``perm[j]``, sizes ``bshape`` in logical order) is
    set. ``bshape`` equals ``shape`` except for pending broadcasts (1 there).
    """

    shape: tuple[Any, ...]
    dtype: np.dtype
    bshape: tuple[Any, ...]
    name: str | None = None
    const: np.ndarray | None = None
    perm: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.perm:
            object.__setattr__(self, "perm", tuple(range(len(self.shape))))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def pending(self) -> bool:
        """True when a broadcast is still to be done (some axis is 1 but should be larger)."""
        return tuple(self.bshape) != tuple(self.shape)

    @property
    def identity(self) -> bool:
        return self.perm == tuple(range(self.rank))


def constant(arr: Any, shape: Sequence[Any] | None = None) -> Val:
    """A constant value (``shape``: its logical shape if the array still has to broadcast)."""
    arr = np.asarray(arr)
    return Val(tuple(shape if shape is not None else arr.shape), arr.dtype, arr.shape, const=arr)


def tensor(name: str, shape: Sequence[Any], dtype: Any, perm: Sequence[int] = (),
           bshape: Sequence[Any] | None = None) -> Val:  # fmt: skip
    shape = tuple(shape)
    return Val(shape, np.dtype(dtype), tuple(bshape or shape), name=name, perm=tuple(perm))


def is_symbolic(d: Any) -> bool:
    return not isinstance(d, int | np.integer)


def same_dim(a: Any, b: Any) -> bool:
    """Whether two dimensions (ints or symbolic) are equal."""
    if is_symbolic(a) != is_symbolic(b):
        return False
    return bool(a == b)


def size_of(d: Any, batch: Any) -> int:
    """An int standing for dimension ``d`` in size arithmetic: ``d`` itself, or ``k * SENTINEL``
    for ``d = k * batch`` (the only symbolic sizes this converter supports)."""
    if not is_symbolic(d):
        return int(d)
    if batch is None:
        raise NotImplementedError(f"symbolic dimension {d} without a batch symbol")
    k = d // batch
    if not isinstance(k, int) or d != k * batch:
        raise NotImplementedError(
            f"dimension {d} is not a multiple of the batch {batch}: not supported by the "
            "ONNX exporter"
        )
    return k * SENTINEL


def inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for j, a in enumerate(perm):
        inv[a] = j
    return tuple(inv)


def transpose_from(cur: Sequence[int], want: Sequence[int]) -> list[int]:
    """ONNX ``Transpose`` perm turning a tensor stored as ``cur`` into one stored as ``want``."""
    pos = inverse(cur)
    return [pos[a] for a in want]


def reshape_groups(ishape: Sequence[int], oshape: Sequence[int]) -> list[tuple[list, list]]:
    """Split a reshape into groups ``(input axes, output axes)`` with equal sizes, in order:
    each group is a merge and/or split of consecutive axes."""
    groups: list[tuple[list, list]] = []
    i = j = 0
    while i < len(ishape) or j < len(oshape):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(ishape):
            gi.append(i)
            pi *= ishape[i]
            i += 1
        if j < len(oshape):
            gj.append(j)
            pj *= oshape[j]
            j += 1
        while pi != pj:
            if (pi < pj and i < len(ishape)) or j >= len(oshape):
                if i >= len(ishape):
                    raise ValueError(f"reshape {tuple(ishape)} -> {tuple(oshape)}: sizes differ")
                gi.append(i)
                pi *= ishape[i]
                i += 1
            else:
                gj.append(j)
                pj *= oshape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def aval_of(atom: Any) -> tuple[tuple[Any, ...], np.dtype]:
    aval = atom.aval
    return tuple(aval.shape), np.dtype(aval.dtype)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))
