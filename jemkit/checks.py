"""Checks of what a user feeds a JEM, each raising (or warning) with what was wrong and what was expected."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from jemkit.energy import check_labels, check_logits

__all__ = [
    "check_choice",
    "check_first_batch",
    "check_input_scale",
    "check_input_shape",
    "check_integer",
    "check_jem_arguments",
    "check_label_count",
    "check_names",
    "check_nonnegative",
    "input_scale_hint",
]

LARGE_INPUT = 50.0
"""Inputs reaching beyond this magnitude are far from the order-1 scale classifiers are initialised for (raw 0..255
pixels, unstandardised features): :func:`check_input_scale` warns."""


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


def check_choice(name: str, value: Any, known: Sequence[Any]) -> Any:
    """``value`` if it is one of ``known``; ``ValueError`` naming ``name``, the value and every choice otherwise."""
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, known))}")
    return value


def check_names(kind: str, given: Sequence[str], known: Sequence[str], allow_empty: bool = True) -> list[str]:
    """``given`` as a list when every name is one of ``known`` (e.g. OOD sets, scores, detectors); ``ValueError``
    naming the unknown ones and every known name otherwise. The one check of a list of names."""
    given = [given] if isinstance(given, str) else list(given)
    unknown = [name for name in given if name not in known]
    if unknown or (not given and not allow_empty):
        raise ValueError(f"unknown {kind} {unknown or given}; expected some of {', '.join(known)}")
    return given


def check_input_shape(x: Tensor, expected: Sequence[int] | None, stage: str) -> None:
    """Every sample of a batch ``x [B, *shape]`` must have the shape the JEM was built for or first saw."""
    shape = tuple(x.shape[1:])
    if expected is not None and shape != tuple(expected):
        raise ValueError(
            f"{stage} inputs have shape {shape} per sample, expected {tuple(expected)} "
            "(the shape given as ReplayBuffer(input_shape=) or seen in the first batch / checkpoint buffer)"
        )


def check_label_count(x: Tensor, y: Any) -> None:
    """One label per input: ``ValueError`` naming both counts (before any code masks inputs by their labels)."""
    if isinstance(y, Tensor) and y.dim() >= 1 and isinstance(x, Tensor) and x.dim() >= 1 and len(y) != len(x):
        raise ValueError(
            f"a batch holds {len(x)} inputs but {len(y)} labels: every input needs one label (check the dataset's "
            "__getitem__ or the loader's collate_fn)"
        )


def input_scale_hint(x: Tensor) -> str | None:
    """What to do about inputs ``x`` reaching beyond :data:`LARGE_INPUT` in magnitude (``None`` when they do not)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    low, high = (float(v) for v in x.detach().aminmax())
    if not max(abs(low), abs(high)) > LARGE_INPUT:  # also False for NaN: named elsewhere
        return None
    return (
        f"the training inputs span [{low:.4g}, {high:.4g}]: an untrained classifier's energies grow with the scale of "
        "its inputs, and at this scale they can trip the DivergenceGuard's limits or swamp the cross-entropy with the "
        "log p(x) terms. Scale the inputs to about [-1, 1] in the data pipeline: pixels in 0..255 as x / 127.5 - 1 (or "
        "torchvision's ToTensor() then Normalize), features standardised as (x - mean) / std"
    )


def check_input_scale(x: Tensor) -> None:
    """Warn when a first training batch ``x`` is far from order-1 scale (see :func:`input_scale_hint`)."""
    hint = input_scale_hint(x)
    if hint is not None:
        warnings.warn(hint[0].upper() + hint[1:], UserWarning, stacklevel=2)


def check_first_batch(x: Tensor, y: Tensor, logits: Tensor, num_classes: int | None) -> int:
    """Labels ``y [B]`` and the classifier's ``logits`` on a first batch fit each other: returns the class count."""
    check_label_count(x, y)
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
    check_nonnegative("data_noise", settings["data_noise"])
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    check_integer("lr_warmup_steps", settings["lr_warmup_steps"], minimum=0)
    if margins is not None and not float(margins[0]) < float(margins[1]):
        raise ValueError(f"margins must be (margin_in, margin_out) with margin_in < margin_out, got {margins}")
