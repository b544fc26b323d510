"""Data modules for jemkit: every one yields ``(x, y)`` batches in ``data_range = (-1, 1)``.

Downstream code (models, samplers, callbacks, the CLI) reads three attributes from any of them instead of
hard-coding a dataset: ``num_classes``, ``input_shape`` (one example, without the batch dimension) and
``data_range`` (the box samplers start from and clamp to). The digits and the Gaussian mixture need no download,
so they serve tests, tutorials and CI; the torchvision modules serve the benchmarks of the JEM papers.
"""

from jemkit.data.digits import DigitsDataModule
from jemkit.data.outliers import WithOutliers
from jemkit.data.toy import GaussianMixtureDataModule
from jemkit.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
    VisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GaussianMixtureDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "VisionDataModule",
    "WithOutliers",
]
