"""What kind of data one input is, told from its shape: the one rule pictures and corruptions both follow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["InputKind", "input_kind"]

InputKind = Literal["image", "points", "signal", "tabular"]


def input_kind(shape: Sequence[int] | None) -> InputKind | None:
    """``"image"`` for ``[C, H, W]``, ``"signal"`` for ``[C, L]``, ``"points"`` for 2-D points ``[2]``, ``"tabular"``
    for rows ``[F]``; ``None`` for any other shape (or none). ``shape`` is one input's, without the batch dimension."""
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) == 3:
        return "image"
    if len(shape) == 2:
        return "signal"
    if len(shape) == 1:
        return "points" if shape[0] == 2 else "tabular"
    return None
