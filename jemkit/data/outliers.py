"""Outlier exposure: a datamodule whose training batches carry outliers next to the labelled data.

The energy-margin term of Liu et al. 2020 (``JEM(weights={"margin": 0.1})``) pushes the energies of known outliers
up. Its batches are ``{"data": (x, y), "outliers": x_out}``; without such batches the JEM uses its own samples as
outliers.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, RandomSampler

from jemkit.checks import check_integer
from jemkit.data._common import check_batch_size

__all__ = ["WithOutliers"]


class WithOutliers(LightningDataModule):
    """``data``'s splits, with an outlier batch drawn (with replacement) beside every training batch.

    Args:
        data: the labelled datamodule; validation, test and prediction are its own.
        outliers: a dataset of outlier inputs (``x`` or ``(x, label)``, labels ignored), or a datamodule whose
            training split serves as one. Same input shape and range as ``data``.
        batch_size: outliers per batch (default: ``data.batch_size``).
        num_workers: loader workers for the outliers.

    Example::

        >>> from jemkit.data import DigitsDataModule
        >>> from jemkit.data.ood import UniformNoise
        >>> dm = WithOutliers(DigitsDataModule(), UniformNoise(1000, (1, 8, 8)))
    """

    def __init__(
        self,
        data: LightningDataModule,
        outliers: Dataset | LightningDataModule,
        batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data, self.outliers = data, outliers
        self.batch_size = batch_size if batch_size is not None else getattr(data, "batch_size", None)
        check_batch_size(self.batch_size)
        self.num_workers = check_integer("num_workers", num_workers, minimum=0)

    def __getattr__(self, name: str) -> Any:
        # num_classes, input_shape, data_range, val_dataset, ... are the labelled datamodule's
        if name in ("data", "outliers") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def setup(self, stage: str) -> None:
        self.data.setup(stage)
        if isinstance(self.outliers, LightningDataModule):
            self.outliers.setup("fit")

    def _outlier_dataset(self) -> Dataset:
        dataset = self.outliers
        if isinstance(dataset, LightningDataModule):
            dataset = getattr(dataset, "train_dataset", None)
        if not isinstance(dataset, Dataset) or len(dataset) == 0:
            raise ValueError(f"outliers must be a non-empty Dataset or a datamodule with one, got {self.outliers!r}")
        return dataset

    def train_dataloader(self) -> CombinedLoader:
        data = self.data.train_dataloader()
        dataset = self._outlier_dataset()
        sampler = RandomSampler(dataset, replacement=True, num_samples=len(data) * self.batch_size)
        outliers = DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers
        )
        return CombinedLoader({"data": data, "outliers": outliers}, mode="min_size")

    def val_dataloader(self) -> Any:
        return self.data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.data.predict_dataloader()
