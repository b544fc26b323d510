"""A small residual network for tiny images (8x8 digits, 28x28 or 32x32): a second image architecture beside SmallCNN.

Classic (post-activation) basic blocks of He et al. (2016) in as few stages and channels as such images need; like
jemkit's other backbones it has no normalisation by default (JEM's choice) and leaky ReLU with slope 0.2.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.models._layers import check_activation, check_norm_layer, make_activation, make_norm

__all__ = ["BasicBlock", "SmallResNet"]


class BasicBlock(nn.Module):
    """``act(norm(conv3x3(act(norm(conv3x3(x, stride))))) + shortcut(x))``, the shortcut being the identity, or a
    1x1 conv (plus norm) where the shape changes. ``[B, c_in, H, W] -> [B, c_out, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, norm: str | None = None, activation: str = "leaky_relu"
    ) -> None:
        super().__init__()
        bias = norm is None  # a conv bias is redundant right before a normalisation layer
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, c_out)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), make_norm(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A 3x3 stem conv to ``width`` channels, then ``len(blocks)`` stages of ``blocks[i]`` basic blocks with
    ``width * 2**i`` channels (every stage after the first halves the resolution), global average pooling and a
    linear head: ``[B, in_channels, H, W] -> logits [B, num_classes]``, for any ``H, W >= 1``.

    The default (``width=16``, ``blocks=(1, 1)``: 8x8 then 4x4 on the digits) has about 19k parameters with one input
    channel and 10 classes, and a training step on a batch of 64 8x8 images takes a few ms on one CPU thread.

    Args:
        num_classes: output logits, >= 1.
        in_channels: input channels.
        width: channels of the stem and the first stage.
        blocks: basic blocks per stage (each >= 1); one stage per entry.
        norm: ``None`` (JEM's default), ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm).
        activation: ``"leaky_relu"`` (slope 0.2, JEM's default), ``"silu"`` or ``"relu"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (1, 1),
        norm: str | None = None,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        check_integer("num_classes", num_classes)
        check_integer("in_channels", in_channels)
        check_integer("width", width)
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("blocks must list the number of blocks of at least one stage, got ()")
        for count in blocks:
            check_integer("every entry of blocks", count)
        check_norm_layer(norm)
        check_activation(activation)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.blocks = blocks
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=norm is None),
            make_norm(norm, width),
            make_activation(activation),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(channels, c_out, stride, norm, activation))
                channels = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> logits [B, num_classes]``."""
        return self.head(self.features(x))
