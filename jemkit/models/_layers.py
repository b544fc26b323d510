"""Layer factories and argument checks shared by jemkit's backbones.

Defaults follow JEM: no normalisation (batch norm's batch-dependent statistics interfere with SGLD sampling; group
norm is the safe alternative) and leaky ReLU with slope 0.2 (a non-zero gradient everywhere helps Langevin dynamics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from jemkit.checks import check_choice

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "check_activation",
    "check_norm_layer",
    "make_activation",
    "make_norm",
]

NORMS: tuple[str | None, ...] = (None, "batch", "group")
"""Accepted ``norm`` values: none (JEM's default), ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm)."""

ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "silu", "relu")
"""Accepted ``activation`` values; ``"leaky_relu"`` uses slope 0.2 as in JEM."""


def check_norm_layer(norm: str | None, known: Sequence[str | None] = NORMS) -> None:
    """Raise ``ValueError`` unless ``norm`` (a normalisation layer's name) is one of ``known``."""
    check_choice("norm", norm, known)


def check_activation(activation: str) -> None:
    """Raise ``ValueError`` unless ``activation`` is one of ``ACTIVATIONS``."""
    check_choice("activation", activation, ACTIVATIONS)


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """Normalisation layer over ``channels`` feature maps: identity, BatchNorm2d, or GroupNorm.

    GroupNorm uses ``gcd(32, channels)`` groups, so it works for any width.
    """
    check_norm_layer(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


def make_activation(activation: str) -> nn.Module:
    """Activation module by name (see ``ACTIVATIONS``)."""
    check_activation(activation)
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.2)
    if activation == "silu":
        return nn.SiLU()
    return nn.ReLU()
