"""Checks of what a user feeds a JEM, each raising (or warning) with what was wrong and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from jemkit.energy import check_labels, check_logits

__all__ = [
    "check_first_batch",
    "check_input_shape",
    "check_integer",
    "check_jem_arguments",
    "check_nonnegative",
]


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an integer ``>= minimum``; a bool is refused (``True`` would read as 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a finite float ``>= 0``; a bool is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


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


def check_jem_arguments(
    settings: dict[str, Any], temperature: float, num_classes: int | None, margins: tuple[float, float] | None
) -> None:
    """``ValueError`` naming the first argument out of its range."""
    if not settings["data_noise"] >= 0:
        raise ValueError(f"data_noise must be >= 0, got {settings['data_noise']!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    check_integer("lr_warmup_steps", settings["lr_warmup_steps"], minimum=0)
    if margins is not None and not float(margins[0]) < float(margins[1]):
        raise ValueError(f"margins must be (margin_in, margin_out) with margin_in < margin_out, got {margins}")
