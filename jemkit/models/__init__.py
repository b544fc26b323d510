"""Backbones for JEM. Any ``nn.Module`` mapping inputs to logits ``[B, num_classes]`` works; these are the ones the
project ships, with consistent ``num_classes`` / ``in_channels`` / ``norm`` / ``activation`` signatures so that
recipes and the CLI can build them by name: ``SmallCNN``, ``SmallResNet`` and ``WideResNet`` for images, ``SignalCNN``
for 1-D signals ``[B, C, L]`` and ``MLP`` for feature vectors ``[B, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from jemkit.models.mlp import MLP
from jemkit.models.pretrained import with_weights
from jemkit.models.resnet import SmallResNet
from jemkit.models.signal_cnn import SignalCNN
from jemkit.models.small_cnn import SmallCNN
from jemkit.models.wide_resnet import WideResNet

__all__ = [
    "MLP",
    "MODELS",
    "SignalCNN",
    "SmallCNN",
    "SmallResNet",
    "WideResNet",
    "create_model",
    "with_weights",
    "wrn28_10",
]


def wrn28_10(**kwargs: Any) -> WideResNet:
    """The JEM backbone: ``WideResNet(depth=28, widen_factor=10, **kwargs)`` (about 36.5M parameters)."""
    return WideResNet(depth=28, widen_factor=10, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "signal_cnn": SignalCNN,
    "small_cnn": SmallCNN,
    "small_resnet": SmallResNet,
    "wrn": WideResNet,
    "wide_resnet": WideResNet,
    "wrn28_10": wrn28_10,
}
"""Name -> model constructor, as accepted by ``create_model``."""


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name, e.g. ``create_model("wrn", depth=16, widen_factor=4, num_classes=10)``.

    Names are case-insensitive and ``-`` may stand for ``_``; an unknown name raises ``ValueError`` listing
    the valid ones.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)
