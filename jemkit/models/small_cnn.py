"""A small convolutional classifier for tiny images (8x8 digits, 28x28 MNIST-like): a JEM that trains on CPU.

It also hosts the layer factories and argument checks the backbones share (``make_norm``,
``make_activation``). Their defaults follow JEM: no normalisation (batch norm's batch-dependent statistics
interfere with SGLD sampling; group norm is the safe alternative) and leaky ReLU with slope 0.2 (a non-zero
gradient everywhere helps Langevin dynamics).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "SmallCNN",
    "check_activation",
    "check_norm",
    "check_positive_int",
    "make_activation",
    "make_norm",
]

NORMS: tuple[str | None, ...] = (None, "batch", "group")
"""Accepted ``norm`` values: none (JEM's default), ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm)."""

ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "silu", "relu")
"""Accepted ``activation`` values; ``"leaky_relu"`` uses slope 0.2 as in JEM."""


def check_norm(norm: str | None) -> None:
    """Raise ``ValueError`` unless ``norm`` is one of ``NORMS``."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of None, 'batch', 'group'")


def check_activation(activation: str) -> None:
    """Raise ``ValueError`` unless ``activation`` is one of ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}"
        )


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """Normalisation layer over ``channels`` feature maps: identity, BatchNorm2d, or GroupNorm.

    GroupNorm uses ``gcd(32, channels)`` groups, so it works for any width.
    """
    check_norm(norm)
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


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (``width``, ``2*width`` stride 2, ``4*width`` stride 2), global average pooling
    and a linear head: ``[B, in_channels, H, W] -> logits [B, num_classes]``, for any ``H, W >= 1``.

    About 94k parameters at ``width=32`` with one input channel and 10 classes.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        norm: str | None = None,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        check_norm(norm)
        check_activation(activation)
        self.num_classes = num_classes
        self.in_channels = in_channels

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            # A conv bias is redundant right before a normalisation layer.
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm is None)
            return nn.Sequential(conv, make_norm(norm, c_out), make_activation(activation))

        self.features = nn.Sequential(
            block(in_channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> logits [B, num_classes]``."""
        return self.head(self.features(x))
