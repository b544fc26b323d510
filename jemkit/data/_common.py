"""Helpers shared by jemkit's data modules: argument checks and the one DataLoader recipe."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from jemkit.checks import check_integer

__all__ = ["check_batch_size", "check_split_fractions", "make_loader", "stratified_split"]


def check_batch_size(batch_size: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` is an integer >= 1."""
    check_integer("batch_size", batch_size)


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions lie in (0, 1) and leave some data for training."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be < 1 so that some data is left for training, "
            f"got {val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}"
        )


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted train/val/test indices of a split stratified by class and fixed by ``seed``: the one split recipe of
    jemkit's data modules (every class in every split; the same seed, the same examples)."""
    rest, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
    )
    return tuple(torch.from_numpy(np.sort(i)) for i in (train, val, test))  # type: ignore[return-value]


def make_loader(dataset: Dataset | None, batch_size: int, num_workers: int, train: bool = False) -> DataLoader:
    """The one loader recipe of jemkit's data modules: training shuffles and drops the last partial batch."""
    if dataset is None:
        raise RuntimeError("the dataset is not built yet: call setup() first")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class SplitDataModule(LightningDataModule):
    """Base of jemkit's data modules: a train/val/test split built by ``setup`` and served with one loader recipe.

    Subclasses set ``batch_size`` and ``num_workers`` and fill ``train_dataset``, ``val_dataset`` and ``test_dataset``
    in ``setup``; prediction runs on the test split.
    """

    batch_size: int
    num_workers: int
    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None
    test_dataset: Dataset | None = None

    def _loader(self, stage: str, dataset_name: str) -> DataLoader:
        self.setup(stage)
        dataset = getattr(self, dataset_name)
        return make_loader(
            dataset, self.batch_size, self.num_workers, train=stage == "fit" and dataset_name == "train_dataset"
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", "train_dataset")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validate", "val_dataset")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", "test_dataset")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", "test_dataset")
