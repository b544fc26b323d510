"""Wide residual network (Zagoruyko & Komodakis 2016) configured as the JEM backbone (Grathwohl et al. 2020).

JEM trains a WRN-28-10 on CIFAR-10 with *no* normalisation layers and leaky ReLU (slope 0.2): batch norm
makes the energy of one image depend on the rest of the batch, which breaks SGLD sampling. Those are the
defaults here; ``norm="batch"`` gives the standard supervised WRN and ``norm="group"`` a batch-independent
alternative.
"""

from __future__ import annotations

from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.models._layers import (
    check_activation,
    check_norm_layer,
    make_activation,
    make_norm,
)

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: ``norm-act-conv3x3(stride)-dropout-norm-act-conv3x3`` plus a
    shortcut (identity, or a 1x1 conv when the shape changes).
    ``[B, c_in, H, W] -> [B, c_out, H / stride, W / stride]``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        dropout: float = 0.0,
        norm: str | None = None,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        bias = norm is None  # JEM keeps conv biases; with a norm layer they are redundant
        self.norm1 = make_norm(norm, c_in)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = make_norm(norm, c_out)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(self.act1(self.norm1(x))))
        out = self.conv2(self.act2(self.norm2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: ``[B, in_channels, H, W] -> logits [B, num_classes]``.

    A 3x3 stem conv to 16 channels, three stages of ``n = (depth - 4) / 6`` wide basic blocks with
    ``16k, 32k, 64k`` channels (``k = widen_factor``; the last two stages halve the resolution), a final
    norm-activation, global average pooling and a linear head. WRN-28-10 with 10 classes has about 36.5M
    parameters; any input size works (32x32 is the usual one).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        norm: str | None = None,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        try:
            valid_depth = (check_integer("depth", depth, minimum=10) - 4) % 6 == 0
        except ValueError:
            valid_depth = False
        if not valid_depth:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
        check_integer("widen_factor", widen_factor)
        check_integer("num_classes", num_classes)
        check_integer("in_channels", in_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_norm_layer(norm)
        check_activation(activation)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.depth = depth
        self.widen_factor = widen_factor

        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
        stages: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                stages.append(WideBasicBlock(c_in, c_out, stride, dropout, norm, activation))
                c_in = c_out
        self.blocks = nn.Sequential(*stages)
        self.final = nn.Sequential(
            make_norm(norm, c_in), make_activation(activation), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> logits [B, num_classes]``."""
        return self.head(self.final(self.blocks(self.stem(x))))
