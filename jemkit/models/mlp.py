"""A multi-layer perceptron for feature vectors (tabular data), or any input flattened to one: a JEM off images."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from jemkit.checks import check_integer
from jemkit.models._layers import check_activation, check_norm_layer, make_activation

__all__ = ["MLP", "MLP_NORMS"]

MLP_NORMS: tuple[str | None, ...] = (None, "batch", "layer")
"""Accepted ``norm`` values of :class:`MLP`: none (JEM's default), ``"batch"`` (BatchNorm1d) or ``"layer"``
(LayerNorm, which, unlike batch norm, does not make one example's energy depend on the rest of the batch)."""


class MLP(nn.Module):
    """Fully connected classifier: ``[B, num_features]`` (or ``[B, *shape]`` with ``prod(shape) = num_features``,
    flattened first) ``-> logits [B, num_classes]``.

    Each hidden layer is ``linear -> norm -> activation -> dropout``; a last linear layer gives the logits.
    ``num_classes=1`` gives a one-logit binary head (``[B, 1]``, for BCE with float 0/1 targets); ``hidden=()`` is
    multinomial logistic regression. About 5.8k parameters with 13 features, ``hidden=(64, 64)`` and 3 classes.

    Args:
        num_features: input features ``D`` per example (the product of the input's non-batch dimensions).
        num_classes: output logits, >= 1.
        hidden: widths of the hidden layers.
        activation: ``"leaky_relu"`` (slope 0.2, JEM's default), ``"silu"`` or ``"relu"``.
        norm: ``None`` (JEM's default), ``"batch"`` or ``"layer"`` after each hidden linear layer.
        dropout: dropout probability after each hidden activation, in [0, 1).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int = 10,
        hidden: Sequence[int] = (64, 64),
        activation: str = "leaky_relu",
        norm: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_integer("num_features", num_features)
        check_integer("num_classes", num_classes)
        hidden = tuple(hidden)
        for width in hidden:
            check_integer("every hidden width", width)
        check_activation(activation)
        check_norm_layer(norm, MLP_NORMS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.hidden = hidden
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = num_features
        for width in hidden:
            layers.append(nn.Linear(width_in, width, bias=norm != "batch"))  # batch norm's shift replaces the bias
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, num_features]`` (or ``[B, *shape]``, flattened) ``-> logits [B, num_classes]``."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.num_features:
            raise ValueError(
                f"MLP expects inputs [B, {self.num_features}] (or [B, *shape] with {self.num_features} values per "
                f"example), got shape {tuple(x.shape)}"
            )
        return self.head(self.features(x))
