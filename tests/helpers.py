"""Helpers shared by several test files: tiny models, loaders, a quiet Trainer and fake colour data.

Import them from here (``from tests.helpers import trainer``), not from another test file, which would tie the two
files together and run the other file's imports and module-level code.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import FakeData

from jemkit.data import CIFAR10DataModule
from jemkit.sampling import InitialDistribution, Sampler

__all__ = [
    "FakeCIFAR10DataModule",
    "FakeColourData",
    "TinyMLP",
    "ZeroInit",
    "loader",
    "toy_loader",
    "trainer",
]


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


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**(defaults | kwargs))


def loader(x, y, batch_size=8, shuffle=False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def toy_loader(n=64, num_classes=3, batch_size=16):
    """``n`` 2-D points in ``num_classes`` tight clusters on a circle of radius 0.6."""
    y = torch.arange(num_classes).repeat(n // num_classes + 1)[:n]
    x = torch.randn(n, 2) * 0.1 + torch.stack([torch.cos(y * 2.0), torch.sin(y * 2.0)], 1) * 0.6
    return loader(x, y, batch_size)


class BackboneWithHead(nn.Module):
    """A classifier built from a backbone given as a config (e.g. a torchvision model with pretrained weights) and a
    linear head with optional BatchNorm: a nested classifier config for the CLI tests."""

    def __init__(self, backbone: nn.Module, features: int = 1000, num_classes: int = 10, head_norm: bool = False):
        super().__init__()
        self.backbone = backbone
        norm = nn.BatchNorm1d(features) if head_norm else nn.Identity()
        self.head = nn.Sequential(norm, nn.Linear(features, num_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


class ReadsFilesWhenBuilt(nn.Module):
    """A classifier whose constructor reads a file (a vocabulary, a label map): it cannot be built where the file is
    missing."""

    def __init__(self, label_map: str = "labels.json"):
        super().__init__()
        with open(label_map) as f:
            self.labels = f.read().split()
        self.linear = nn.Linear(4, len(self.labels))

    def forward(self, x):
        return self.linear(x)


class ZeroInit(InitialDistribution):
    """Chains that always start (and, with 0 SGLD steps, end) at the origin."""

    def _sample(self, n, shape, device, dtype, y):
        return torch.zeros((n, *shape), device=device, dtype=dtype)


class FakeColourData(FakeData):
    """Stands in for CIFAR/SVHN: accepts both of their signatures, 24 training and 8 test images of 3x32x32."""

    def __init__(self, root, train=True, split="train", transform=None, download=False) -> None:
        is_train = train and split == "train"
        super().__init__(size=24 if is_train else 8, image_size=(3, 32, 32), transform=transform)


class FakeCIFAR10DataModule(CIFAR10DataModule):
    """CIFAR-10's data module on :class:`FakeColourData`: ``--data.class_path=tests.helpers.FakeCIFAR10DataModule``."""

    dataset_cls = FakeColourData


class KeepStart(Sampler):
    """A sampler whose chains stay where they start: samples are exactly the buffer's start points, so that a loss
    on them has a closed form."""

    n_steps = 1

    def sample(self, energy_fn, x0, n_steps=None, step=None):
        return x0.detach().clone()
