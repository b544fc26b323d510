"""Reading a training or evaluation batch as a classifier's loader gives it: ``(inputs, labels)`` tuples or dicts,
integer or 0/1 float labels, and outlier batches for the energy-margin term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["class_labels", "split_outliers", "unpack_batch"]


def class_labels(y: Tensor) -> Tensor:
    """Integer class labels ``[B]`` from labels as a classifier's loader gives them: integers ``[B]``, or the 0/1 floats
    ``[B]`` / ``[B, 1]`` of a binary (BCE) head. Without a host sync: a float label that is not a whole number becomes
    ``-1``, which the label checks then name."""
    if not isinstance(y, Tensor):
        return y
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.is_floating_point():
        whole = y == y.round()
        y = torch.where(whole, y, torch.full_like(y, -1.0)).long()
    elif y.dtype == torch.bool:
        y = y.long()
    return y


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a labelled batch: a ``(x, y, ...)`` tuple/list or a dict with ``x``/``image`` and
    ``y``/``label`` keys; labels as :func:`class_labels` gives them."""
    if isinstance(batch, dict):
        x = batch["x"] if "x" in batch else batch["image"]
        return x, class_labels(batch["y"] if "y" in batch else batch["label"])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], class_labels(batch[1])
    raise TypeError(f"expected batches of (inputs, labels), got {type(batch).__name__}")


def split_outliers(batch: Any) -> tuple[Any, Tensor | None]:
    """``(labelled batch, outlier inputs or None)``: a training batch ``{"data": batch, "outliers": x_out}`` (what
    Lightning's ``CombinedLoader`` gives for a dict of loaders) carries outliers for the energy-margin term; any
    other batch carries none. Outlier batches may be bare inputs or ``(inputs, labels)`` (labels ignored)."""
    if isinstance(batch, dict) and "outliers" in batch:
        if "data" not in batch:
            raise KeyError(f"a batch with 'outliers' needs its labelled data under 'data', got keys {sorted(batch)}")
        outliers = batch["outliers"]
        return batch["data"], outliers[0] if isinstance(outliers, (tuple, list)) else outliers
    return batch, None
