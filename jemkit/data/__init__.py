"""Data modules for jemkit: every one yields ``(x, y)`` batches and describes them with three attributes.

Downstream code (models, callbacks, the CLI) reads them from any module instead of hard-coding a dataset:
``num_classes``, ``input_shape`` (one example, without the batch dimension) and ``data_range`` (the inputs' nominal
range, a description only). Where chains start, move and are clamped, and where attacks and noise sets stay, is the
JEM's :class:`~jemkit.sampling.InputDomain`, fitted on the training data whatever its scale (or declared). The image
modules and the Gaussian mixture yield inputs in ``data_range = (-1, 1)`` (the digits optionally ``[0, 1]`` or
standardised, with ``data_range`` to match). The tabular and signal modules keep their data's own, unbounded scale,
like most users' pipelines: their ``data_range`` is ``None``.

The digits, the Gaussian mixture, the scikit-learn tabular sets and the synthetic signals need no download, so they
serve tests, tutorials and CI; the torchvision modules serve the benchmarks of the JEM papers.
"""

from jemkit.data.cifar10c import CIFAR10CDataModule
from jemkit.data.digits import DigitsDataModule
from jemkit.data.outliers import WithOutliers
from jemkit.data.signals import SignalsDataModule
from jemkit.data.tabular import TabularDataModule
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
    "CIFAR10CDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GaussianMixtureDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "SignalsDataModule",
    "TabularDataModule",
    "VisionDataModule",
    "WithOutliers",
]
