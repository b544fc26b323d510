"""Checks of what a user feeds a JEM, each raising (or warning) with what was wrong and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from jemkit.energy import check_labels, check_logits

__all__ = ["check_first_batch", "check_input_shape", "warn_if_outside_range"]


def check_input_shape(x: Tensor, expected: Sequence[int] | None, stage: str) -> None:
    """Every sample of a batch ``x [B, *shape]`` must have the shape the JEM was built for or first saw."""
    shape = tuple(x.shape[1:])
    if expected is not None and shape != tuple(expected):
        raise ValueError(
            f"{stage} inputs have shape {shape} per sample, expected {tuple(expected)} "
            "(the shape given as ReplayBuffer(input_shape=) or seen in the first batch / checkpoint buffer)"
        )


def check_first_batch(x: Tensor, y: Tensor, logits: Tensor, num_classes: int | None) -> int:
    """Labels ``y [B]`` and the classifier's ``logits`` on a first batch fit each other: returns the class count."""
    check_labels(y, x.shape[0])
    check_logits(logits)
    found = int(logits.shape[1])
    if num_classes is not None and found != num_classes:
        raise ValueError(f"the classifier returns {found} logits but num_classes={num_classes}")
    check_labels(y, x.shape[0], found)
    return found


def warn_if_outside_range(x: Tensor, low: float, high: float) -> None:
    """Chains start in ``[low, high]``; training data far outside it (e.g. 0..255 pixels) is a mistake."""
    x_min, x_max = float(x.min()), float(x.max())
    margin = 0.1 * (high - low)
    if x_min < low - margin or x_max > high + margin:
        rank_zero_warn(
            f"training inputs lie in [{x_min:.3g}, {x_max:.3g}] but SGLD chains start in [{low:g}, {high:g}]: "
            "scale the data to the sampler's range (jemkit's datamodules give [-1, 1]) or pass "
            f"buffer=ReplayBuffer(init=UniformInit({x_min:.3g}, {x_max:.3g}))"
        )
