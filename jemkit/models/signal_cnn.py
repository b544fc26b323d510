"""A small 1-D convolutional classifier for signals and sequences ``[B, C, L]``: a JEM on time series, on CPU."""

from __future__ import annotations

from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.models._layers import check_activation, check_norm_layer, make_activation, make_norm

__all__ = ["SignalCNN"]


class SignalCNN(nn.Module):
    """Three 1-D conv blocks (``width``, ``2*width`` stride 2, ``4*width`` stride 2, kernel ``kernel_size``), global
    average pooling over time and a linear head: ``[B, in_channels, L] -> logits [B, num_classes]``, for any ``L >= 1``.

    Each block is ``conv -> norm -> activation``; the pooling makes the prediction (nearly) invariant to shifts in time.
    About 52k parameters at ``width=32``, ``kernel_size=5`` with one input channel and 10 classes.

    Args:
        num_classes: output logits, >= 1 (1: a one-logit binary head).
        in_channels: input channels ``C``.
        width: channels of the first block (the next two have 2x and 4x).
        norm: ``None`` (JEM's default), ``"batch"`` (BatchNorm1d) or ``"group"`` (GroupNorm).
        activation: ``"leaky_relu"`` (slope 0.2, JEM's default), ``"silu"`` or ``"relu"``.
        kernel_size: odd temporal kernel size of every conv.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        norm: str | None = None,
        activation: str = "leaky_relu",
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        check_integer("num_classes", num_classes)
        check_integer("in_channels", in_channels)
        check_integer("width", width)
        check_integer("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the output keeps the length), got {kernel_size!r}")
        check_norm_layer(norm)
        check_activation(activation)
        self.num_classes = num_classes
        self.in_channels = in_channels

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            # A conv bias is redundant right before a normalisation layer.
            conv = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=norm is None)
            norm_layer = nn.BatchNorm1d(c_out) if norm == "batch" else make_norm(norm, c_out)  # GroupNorm is any-D
            return nn.Sequential(conv, norm_layer, make_activation(activation))

        self.features = nn.Sequential(
            block(in_channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, L] -> logits [B, num_classes]``."""
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"SignalCNN expects inputs [B, {self.in_channels}, L], got shape {tuple(x.shape)}")
        return self.head(self.features(x))
