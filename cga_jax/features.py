"""Which feature maps to return: timm's ``feature_take_indices`` rule, without torch."""

from __future__ import annotations

from collections.abc import Sequence


def feature_take_indices(
    num_features: int, indices: int | Sequence[int] | None = None
) -> tuple[list[int], int]:
    """Absolute indices to take and the largest of them.

    ``None``: all; an int ``k``: the last ``k`` (``1 <= k <= num_features``); a sequence: those
    indices, negative ones counted from the end. Out-of-range values raise ``ValueError``.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            idx = num_features + int(i) if i < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(
                    f"feature index {i} is out of range (0 to {num_features - 1}, or negative)"
                )
            take.append(idx)
        if not take:
            raise ValueError("indices is empty: ask for at least one feature map")
    return take, max(take)
