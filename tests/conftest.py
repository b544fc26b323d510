"""Shared fixtures: tiny models and data built in milliseconds."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyMLP(nn.Module):
    """A 2-layer MLP classifier on flat or image inputs."""

    def __init__(self, in_features: int = 2, num_classes: int = 3, hidden: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.SiLU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    return TinyMLP()
